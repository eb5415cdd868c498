// Voice mode: the microphone streams 16 kHz 16-bit PCM to /v1/voice/ws; the server says when the utterance
// ends, and sends back the transcript, the answer's text (into the chat) and its audio sentence by sentence,
// played as it arrives. Click the microphone to talk; click again to end the utterance without waiting.
import { apiKey, getJson } from "./api.js";

const $ = (id) => document.getElementById(id);
const SAMPLE_RATE = 16000;
const FRAME_SAMPLES = 320; // 20 ms per socket frame

export class Voice {
  constructor(chat) {
    this.chat = chat;
    this.socket = null;
    this.microphone = null; // {context, stream} while capturing
    this.player = new Player();
    this.state = "idle"; // idle | listening | answering
    this.answer = null; // the chat message being filled
    this.pendingAudio = null; // the audio event whose WAV frame comes next
    this.turns = []; // done events: transcripts, answers and stage timings (for the console and the tests)
    this.audioFrames = 0;
    this.button = $("mic");
  }

  // Show the microphone button when the server has voice mode; otherwise say why in its tooltip.
  async init() {
    const status = await getJson("/v1/voice");
    this.button.hidden = !status.available;
    $("voice-status").textContent = status.available ? "" : status.reason;
    this.button.addEventListener("click", () => this.toggle());
  }

  toggle() {
    if (this.state === "listening") this.send({ type: "end" });
    else this.listen().catch((error) => this.fail(error.message));
  }

  async listen() {
    this.player.stop(); // talking over the answer stops it (the server stops generating too)
    await this.connect();
    const { stream, stream_options, ...options } = this.chat.request();
    this.send({ type: "start", ...options });
    await this.startMicrophone();
    this.setState("listening", "listening…");
  }

  connect() {
    if (this.socket?.readyState === WebSocket.OPEN) return Promise.resolve();
    const url = new URL("/v1/voice/ws", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    if (apiKey()) url.searchParams.set("api_key", apiKey());
    this.socket = new WebSocket(url);
    this.socket.binaryType = "arraybuffer";
    this.socket.onmessage = (message) => this.receive(message.data);
    this.socket.onclose = () => {
      this.stopMicrophone();
      if (this.state !== "idle") this.setState("idle", "voice connection closed");
    };
    return new Promise((resolve, reject) => {
      this.socket.onopen = () => resolve();
      this.socket.onerror = () => reject(new Error("cannot open the voice socket (API key?)"));
    });
  }

  send(command) {
    this.socket?.send(JSON.stringify(command));
  }

  async startMicrophone() {
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: false, autoGainControl: false },
    });
    const context = new AudioContext({ sampleRate: SAMPLE_RATE }); // the browser resamples the microphone
    await context.audioWorklet.addModule("/static/mic-worklet.js");
    const capture = new AudioWorkletNode(context, "pcm-capture");
    let frame = new Int16Array(FRAME_SAMPLES), filled = 0;
    capture.port.onmessage = ({ data }) => {
      for (const sample of data) {
        frame[filled++] = Math.max(-32768, Math.min(32767, Math.round(sample * 32767)));
        if (filled === FRAME_SAMPLES) {
          if (this.socket?.readyState === WebSocket.OPEN) this.socket.send(frame.buffer);
          frame = new Int16Array(FRAME_SAMPLES);
          filled = 0;
        }
      }
    };
    context.createMediaStreamSource(stream).connect(capture);
    this.microphone = { context, stream };
  }

  stopMicrophone() {
    if (!this.microphone) return;
    this.microphone.stream.getTracks().forEach((track) => track.stop());
    this.microphone.context.close();
    this.microphone = null;
  }

  receive(data) {
    if (data instanceof ArrayBuffer) {
      this.audioFrames += 1;
      this.player.play(data);
      this.pendingAudio = null;
      return;
    }
    const event = JSON.parse(data);
    switch (event.type) {
      case "speech_start":
        this.setState("listening", "hearing you…");
        break;
      case "speech_end":
        this.stopMicrophone();
        this.setState("answering", "transcribing…");
        break;
      case "transcript":
        if (event.text) this.answer = this.chat.voiceTurn(event.text);
        else this.setState("idle", "no speech heard");
        break;
      case "delta":
        this.answer?.append(event.content);
        break;
      case "audio":
        this.pendingAudio = event;
        break;
      case "done":
        this.turns.push(event);
        this.answer?.finish(latencies(event.timings));
        this.answer = null;
        this.setState("idle", event.transcript ? "" : "no speech heard");
        break;
      case "error":
        this.fail(event.error.message);
        break;
    }
  }

  // Stop listening or answering (the Stop button): the server aborts the answer, the page stops playing it.
  cancel() {
    if (this.state === "idle") return;
    this.send({ type: "cancel" });
    this.player.stop();
    this.stopMicrophone();
    this.answer?.finish("stopped");
    this.answer = null;
    this.setState("idle", "stopped");
  }

  fail(message) {
    this.stopMicrophone();
    this.answer?.finish(`[${message}]`);
    this.answer = null;
    this.setState("idle", message);
  }

  setState(state, note) {
    this.state = state;
    this.button.dataset.state = state;
    this.button.textContent = state === "listening" ? "● Listening (click to end)" : "Talk";
    $("voice-status").textContent = note;
    this.onChange?.();
  }
}

// "transcript 20 ms · first token 80 ms · first audio 260 ms after the 500 ms pause that ended your turn"
// (negative: done during the pause, by the answer begun speculatively).
function latencies(timings) {
  const parts = [`transcript ${Math.round(timings.transcript)} ms`];
  if (timings.first_token !== undefined) parts.push(`first token ${Math.round(timings.first_token)} ms`);
  if (timings.first_audio !== undefined) parts.push(`first audio ${Math.round(timings.first_audio)} ms`);
  const pause = timings.silence_ms ? `the ${timings.silence_ms} ms pause that ended your turn` : "you ended your turn";
  return `${parts.join(" · ")} after ${pause}`;
}

// Plays WAV files back to back, in the order they came.
class Player {
  constructor() {
    this.context = null;
    this.endsAt = 0;
    this.sources = [];
    this.queue = Promise.resolve();
  }

  play(wav) {
    this.context = this.context || new AudioContext();
    const context = this.context;
    this.queue = this.queue.then(async () => {
      const buffer = await context.decodeAudioData(wav);
      if (context !== this.context) return; // stopped meanwhile
      const source = context.createBufferSource();
      source.buffer = buffer;
      source.connect(context.destination);
      const at = Math.max(context.currentTime, this.endsAt);
      source.start(at);
      this.endsAt = at + buffer.duration;
      this.sources.push(source);
    }).catch((error) => console.warn("cannot play the answer's audio:", error.message));
  }

  stop() {
    this.context?.close();
    this.context = null;
    this.endsAt = 0;
    this.sources = [];
  }
}
