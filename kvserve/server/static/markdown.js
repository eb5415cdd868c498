// A small Markdown renderer for answers: fenced and inline code, headings, lists, bold, italic, links.
// Everything is HTML-escaped first, so model output can never inject markup.

function escapeHtml(text) {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
}

function inline(text) {
  return text
    .replace(/`([^`]+)`/g, "<code>$1</code>")
    .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>")
    .replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g, '<a href="$2" target="_blank" rel="noopener">$1</a>');
}

// Markdown text (possibly cut mid-stream) -> HTML.
export function renderMarkdown(text) {
  const parts = escapeHtml(text).split(/^```/m); // even parts are prose, odd parts code (an open fence too)
  return parts.map((part, i) => {
    if (i % 2 === 1) {
      const newline = part.indexOf("\n");
      const lang = newline < 0 ? "" : part.slice(0, newline).trim();
      const code = newline < 0 ? "" : part.slice(newline + 1);
      return `<pre><code data-lang="${lang}">${code.replace(/\n$/, "")}</code></pre>`;
    }
    return renderBlocks(part);
  }).join("");
}

function renderBlocks(text) {
  const html = [];
  let list = null; // "ul" or "ol" while inside a list
  const closeList = () => { if (list) { html.push(`</${list}>`); list = null; } };
  for (const line of text.split("\n")) {
    const heading = line.match(/^(#{1,4})\s+(.*)$/);
    const bullet = line.match(/^\s*[-*+]\s+(.*)$/);
    const numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
    if (heading) {
      closeList();
      html.push(`<h${heading[1].length + 2}>${inline(heading[2])}</h${heading[1].length + 2}>`);
    } else if (bullet || numbered) {
      const kind = bullet ? "ul" : "ol";
      if (list !== kind) { closeList(); html.push(`<${kind}>`); list = kind; }
      html.push(`<li>${inline((bullet || numbered)[1])}</li>`);
    } else if (line.trim() === "") {
      closeList();
    } else {
      closeList();
      html.push(`<p>${inline(line)}</p>`);
    }
  }
  closeList();
  return html.join("");
}
