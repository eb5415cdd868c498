// Wires the page: the model name, the chat's buttons, the KV view and the key button.
import { askForKey, getJson } from "./api.js";
import { Chat } from "./chat.js";
import { KvView, showKvMemory } from "./kv.js";
import { Voice } from "./voice.js";

const $ = (id) => document.getElementById(id);

async function main() {
  const models = await getJson("/v1/models");
  const model = models.data[0].id;
  $("model-name").textContent = model;
  const chat = new Chat(model);
  const voice = new Voice(chat);
  const updateButtons = () => {
    const busy = chat.busy || voice.state !== "idle";
    $("send").disabled = busy;
    $("stop").disabled = !busy;
    $("regenerate").disabled = busy || chat.history.at(-1)?.role !== "assistant";
  };
  chat.onChange = updateButtons;
  voice.onChange = updateButtons;
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || chat.busy) return;
    $("prompt").value = "";
    chat.send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => { chat.stop(); voice.cancel(); });
  $("regenerate").addEventListener("click", () => chat.regenerate());
  $("clear").addEventListener("click", () => { chat.clear(); updateButtons(); });
  $("key-button").addEventListener("click", () => askForKey());
  $("kv-memory").addEventListener("toggle", () => showKvMemory().catch((e) => {
    $("kv-memory-table").textContent = e.message;
  }), { once: true });
  const view = new KvView();
  view.start();
  window.kvserve = { chat, view, voice }; // for the console (and the browser tests)
  voice.init().catch((error) => { $("voice-status").textContent = `voice mode: ${error.message}`; });
}

main().catch((error) => {
  $("model-name").textContent = `cannot reach the server: ${error.message}`;
});
