"""Cut a streamed answer into sentences, so that each is spoken as soon as it ends, while the model goes on."""

from __future__ import annotations

import re

# A sentence ends at . ! ? (maybe closed by quotes or brackets) followed by white space, or at a line break.
_END = re.compile(r"""[.!?…]["')\]]*\s+|\n+""")
_LIST_MARKER = re.compile(r"[\s\d.)*+-]*")  # "1." or "- " alone is not a sentence: it joins the next
# The first piece may end at a clause (a comma, colon or semicolon after FIRST_CLAUSE_CHARS): the first audio is
# what the user waits for, and a clause is as natural a place to breathe as a full stop.
_CLAUSE_END = re.compile(r"[,;:]\s+")
FIRST_CLAUSE_CHARS = 30
MAX_CHARS = 240  # a longer run without an end is cut at its last comma or space: speech must not wait for it
_CODE_BLOCK = re.compile(r"```.*?(```|$)", re.DOTALL)
_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_MARKUP = re.compile(r"[*_`#>|~]+")


class SentenceSplitter:
    """Feed text deltas; get back the sentences they completed."""

    def __init__(self) -> None:
        self.buffer = ""
        self.started = False  # a piece has been returned

    def feed(self, delta: str) -> list[str]:
        self.buffer += delta
        sentences = []
        start = 0
        while (end := self._next_end(start)) is not None:
            start = end.end()
            if not _LIST_MARKER.fullmatch(self.buffer[:start]):
                sentences.append(self.buffer[:start])
                self.buffer, start, self.started = self.buffer[start:], 0, True
        while len(self.buffer) > MAX_CHARS:
            cut = max(self.buffer.rfind(",", 0, MAX_CHARS), self.buffer.rfind(" ", 0, MAX_CHARS)) + 1 or MAX_CHARS
            sentences.append(self.buffer[:cut])
            self.buffer, self.started = self.buffer[cut:], True
        return [s for s in (sentence.strip() for sentence in sentences) if s]

    def _next_end(self, start: int) -> re.Match[str] | None:
        end = _END.search(self.buffer, start)
        if not self.started:
            clause = _CLAUSE_END.search(self.buffer, max(start, FIRST_CLAUSE_CHARS))
            if clause is not None and (end is None or clause.start() < end.start()):
                return clause
        return end

    def flush(self) -> list[str]:
        """The rest, at the end of the answer."""
        rest, self.buffer = self.buffer.strip(), ""
        return [rest] if rest else []


def speakable(markdown: str) -> str:
    """What a voice should say of a Markdown sentence: no code blocks, link text only, no markup characters."""
    text = _LINK.sub(r"\1", _CODE_BLOCK.sub(" ", markdown))
    return " ".join(_MARKUP.sub(" ", text).split())
