// Runs on the audio thread: hands each block of microphone samples (128 float32 at the context's 16 kHz) to the
// page, which sends them to /v1/voice/ws as 16-bit PCM.
class PcmCapture extends AudioWorkletProcessor {
  process(inputs) {
    const channel = inputs[0]?.[0];
    if (channel) this.port.postMessage(channel.slice(0));
    return true;
  }
}

registerProcessor("pcm-capture", PcmCapture);
