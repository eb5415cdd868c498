// The chat: streams /v1/chat/completions answers into the page, with stop, regenerate and per-answer timings.
import { apiFetch, errorMessage, sseEvents } from "./api.js";
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);

export class Chat {
  constructor(model) {
    this.model = model;
    this.history = []; // {role, content} of the conversation so far
    this.controller = null; // aborts the answer being streamed
    this.messages = $("messages");
  }

  get busy() {
    return this.controller !== null;
  }

  send(text) {
    this.history.push({ role: "user", content: text });
    this.addMessage("user").textContent = text;
    return this.answer();
  }

  stop() {
    this.controller?.abort();
  }

  // Drop the last answer and ask again.
  regenerate() {
    if (this.busy || this.history.at(-1)?.role !== "assistant") return Promise.resolve();
    this.history.pop();
    this.messages.querySelector(".message.assistant:last-of-type")?.remove();
    return this.answer();
  }

  clear() {
    this.stop();
    this.history = [];
    this.messages.replaceChildren();
  }

  addMessage(role) {
    const element = document.createElement("div");
    element.className = `message ${role}`;
    this.messages.append(element);
    this.messages.scrollTop = this.messages.scrollHeight;
    return element;
  }

  // An assistant message being streamed: its text in `body`, its timings in `stats`.
  addAnswer() {
    const element = this.addMessage("assistant");
    const body = document.createElement("div");
    const stats = document.createElement("span");
    stats.className = "stats";
    element.append(body, stats);
    element.dataset.state = "streaming";
    return { element, body, stats };
  }

  request() {
    const system = $("system-prompt").value.trim();
    const number = (id) => ($(id).value === "" ? undefined : Number($(id).value));
    return {
      model: this.model,
      messages: system ? [{ role: "system", content: system }, ...this.history] : this.history,
      stream: true,
      stream_options: { include_usage: true },
      temperature: number("temperature"),
      top_p: number("top-p"),
      max_tokens: number("max-tokens"),
      seed: number("seed"),
    };
  }

  // A turn of voice mode: the transcript as the user's message, then the answer as the voice socket streams it.
  voiceTurn(transcript) {
    this.history.push({ role: "user", content: transcript });
    this.addMessage("user").textContent = transcript;
    const { element, body, stats } = this.addAnswer();
    let text = "";
    return {
      append: (delta) => {
        text += delta;
        body.innerHTML = renderMarkdown(text);
        this.messages.scrollTop = this.messages.scrollHeight;
      },
      finish: (note) => {
        element.dataset.state = note === "stopped" ? "stopped" : "done";
        if (text) this.history.push({ role: "assistant", content: text });
        stats.textContent = note;
        this.onChange?.();
      },
    };
  }

  // Stream one answer to the history; its element shows the text as it comes, then TTFT, TPOT and tokens/s.
  async answer() {
    const { element, body, stats } = this.addAnswer();
    this.controller = new AbortController();
    this.onChange?.();
    const started = performance.now();
    let text = "", first = null, last = null, numDeltas = 0, numTokens = null;
    try {
      const response = await apiFetch("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(this.request()),
        signal: this.controller.signal,
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      for await (const chunk of sseEvents(response)) {
        if (chunk.usage) numTokens = chunk.usage.completion_tokens;
        const delta = chunk.choices?.[0]?.delta?.content;
        if (!delta) continue;
        last = performance.now();
        first = first ?? last;
        numDeltas += 1;
        text += delta;
        body.innerHTML = renderMarkdown(text);
        this.messages.scrollTop = this.messages.scrollHeight;
      }
      element.dataset.state = "done";
    } catch (error) {
      if (error.name === "AbortError") {
        element.dataset.state = "stopped";
      } else {
        element.dataset.state = "error";
        element.classList.add("error");
        body.textContent = `${text}\n[${error.message}]`;
      }
    } finally {
      this.controller = null;
      if (text) this.history.push({ role: "assistant", content: text });
      stats.textContent = timings(started, first, last, numTokens ?? numDeltas, element.dataset.state);
      this.onChange?.();
    }
  }
}

// "TTFT 120 ms · TPOT 25 ms · 38.1 tok/s · 64 tokens" (TPOT over the tokens after the first).
function timings(started, first, last, numTokens, state) {
  if (first === null) return state === "stopped" ? "stopped before the first token" : "";
  const parts = [`TTFT ${Math.round(first - started)} ms`];
  if (numTokens > 1) parts.push(`TPOT ${((last - first) / (numTokens - 1)).toFixed(1)} ms`);
  parts.push(`${(numTokens / ((last - started) / 1000)).toFixed(1)} tok/s`, `${numTokens} tokens`);
  if (state === "stopped") parts.push("stopped");
  return parts.join(" · ");
}
