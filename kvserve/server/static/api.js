// Requests to the server's /v1 API with the stored API key; a 401 asks for the key once and retries.

const KEY_STORAGE = "kvserve-api-key";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

// Show the key dialog; resolves true when a key was saved.
export function askForKey() {
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  input.value = apiKey();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      const saved = dialog.returnValue === "save" && input.value.trim() !== "";
      if (saved) setApiKey(input.value.trim());
      resolve(saved);
    }, { once: true });
    dialog.showModal();
  });
}

let keyPrompt = null; // one dialog at a time, shared by concurrent 401s

// fetch() with the Authorization header; on 401 asks for a key (once) and retries.
export async function apiFetch(path, options = {}) {
  for (let attempt = 0; ; attempt++) {
    const headers = { ...(options.headers || {}) };
    if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
    const response = await fetch(path, { ...options, headers });
    if (response.status !== 401 || attempt > 0) return response;
    keyPrompt = keyPrompt || askForKey().finally(() => { keyPrompt = null; });
    if (!(await keyPrompt)) return response;
  }
}

// The error message of an OpenAI-shaped error body (or the status line).
export async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error?.message || JSON.stringify(body);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

export async function getJson(path) {
  const response = await apiFetch(path);
  if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
  return response.json();
}

// Each `data:` payload of a server-sent event stream, parsed as JSON, until [DONE].
export async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}
