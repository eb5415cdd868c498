"""Voice mode's latency budget, stage by stage: questions spoken by espeak-ng are streamed to /v1/voice/ws in
real time (20 ms frames, as the page sends them), and the client clocks each stage from the moment the speech
really ended: the endpointer's pause, the transcript, the first token, the first sentence and the first audio
byte back; with the answer begun speculatively in the pause and without, for two pause lengths, side by side.
The bundled model is served in this process unless --url names a running server.

    .venv/bin/python benchmarks/bench_voice.py > /tmp/voice.json
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import subprocess
import threading
import time
from typing import Any

import numpy as np
from websockets.sync.client import connect

from kvserve.voice.audio import SAMPLE_RATE, decode_audio

QUESTIONS = ["What is the capital of France?", "Name three colors of the rainbow.", "How many days are in a week?",
             "What do bees make?", "Tell me a fun fact about the moon."]
SYSTEM = "You are a voice assistant. Answer in one or two short sentences."
FRAME_SAMPLES = 320  # 20 ms


def spoken(text: str, silence_s: float) -> tuple[bytes, float]:
    """16 kHz 16-bit PCM of `text` (espeak-ng, en-us) between 0.3 s and `silence_s` of silence, and the second at
    which the speech ends."""
    wav = subprocess.run(["espeak-ng", "-v", "en-us", "--stdout", text], capture_output=True, check=True).stdout
    speech = decode_audio(wav)
    voiced = np.flatnonzero(np.abs(speech) > 0.01)
    speech = speech[: voiced[-1] + 1]  # espeak-ng's own trailing silence counts as the pause
    lead = np.zeros(int(0.3 * SAMPLE_RATE), np.float32)
    samples = np.concatenate([lead, speech, np.zeros(int(silence_s * SAMPLE_RATE), np.float32)])
    return (samples * 32767).astype("<i2").tobytes(), (len(lead) + len(speech)) / SAMPLE_RATE


def run_turn(url: str, question: str, options: dict[str, Any], silence_s: float) -> dict[str, Any]:
    pcm, speech_end_s = spoken(question, silence_s)
    marks: dict[str, float] = {}
    with connect(url.replace("http", "ws", 1) + "/v1/voice/ws", max_size=2**24, open_timeout=30) as ws:
        ws.send(json.dumps({"type": "start", **options}))
        assert json.loads(ws.recv(timeout=30))["type"] == "listening"
        done = threading.Event()
        events: list[dict] = []

        def read() -> None:
            while not done.is_set():
                frame = ws.recv(timeout=120)
                now = time.perf_counter()
                if isinstance(frame, bytes):
                    marks.setdefault("first_audio_byte", now)
                    continue
                event = json.loads(frame)
                events.append(event)
                marks.setdefault(event["type"], now)
                if event["type"] in ("done", "error"):
                    done.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        started = time.perf_counter()
        for index, start in enumerate(range(0, len(pcm) // 2, FRAME_SAMPLES)):
            if done.is_set() or "speech_end" in marks:
                break
            time.sleep(max(0.0, started + index * FRAME_SAMPLES / SAMPLE_RATE - time.perf_counter()))
            ws.send(pcm[2 * start: 2 * (start + FRAME_SAMPLES)])
        reader.join(180)
    final = events[-1]
    if final["type"] != "done":
        raise RuntimeError(f"turn failed: {final}")
    speech_end = started + speech_end_s  # when the speaker really stopped, on the client's clock

    def after(stage: str) -> float | None:
        return round((marks[stage] - speech_end) * 1000, 1) if stage in marks else None

    return {"question": question, "transcript": final["transcript"], "answer": final["answer"],
            "ms_after_speech_end": {"end_detected": after("speech_end"), "transcript": after("transcript"),
                                    "first_token": after("delta"), "first_audio_byte": after("first_audio_byte"),
                                    "done": after("done")},
            "server_ms_after_detection": final["timings"]}


def serve_bundled_model() -> str:
    """The bundled model behind a uvicorn server on a free port in this process; its URL."""
    import uvicorn

    from kvserve import LLM
    from kvserve.engine.async_engine import AsyncEngine
    from kvserve.server.api_server import build_app
    from kvserve.server.config import ServerConfig
    from kvserve.server.metrics import ServerMetrics

    llm = LLM(show_progress=False)
    metrics = ServerMetrics()
    async_engine = AsyncEngine(llm.engine, metrics)
    async_engine.start()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(build_app(async_engine, metrics, ServerConfig()), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{listener.getsockname()[1]}"


def summarize(turns: list[dict[str, Any]]) -> dict[str, float]:
    stages = turns[0]["ms_after_speech_end"].keys()
    return {stage: statistics.median(t["ms_after_speech_end"][stage] for t in turns) for stage in stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="a running kvserve server (default: serve the bundled model)")
    parser.add_argument("--silence-ms", type=int, nargs="+", default=[500, 800], help="the endpointer's pauses")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    url = args.url or serve_bundled_model()
    base = {"messages": [{"role": "system", "content": SYSTEM}], "temperature": 0, "max_tokens": args.max_tokens}
    run_turn(url, QUESTIONS[0], base, 1.5)  # warm-up: the first turn loads Whisper
    configs = {f"silence {ms} ms, {'speculative' if speculate else 'after the pause'}":
               {**base, "silence_ms": ms, "speculate": speculate}
               for ms in args.silence_ms for speculate in (True, False)}
    turns: dict[str, list] = {name: [] for name in configs}
    for question in QUESTIONS:  # configurations alternate question by question
        for name, options in configs.items():
            turns[name].append(run_turn(url, question, options, max(args.silence_ms) / 1000 + 1.0))
    medians = {name: summarize(config_turns) for name, config_turns in turns.items()}
    print(json.dumps({"machine": platform.machine(), "processor": platform.processor(),
                      "median_ms_after_speech_end": medians, "turns": turns}, indent=2))


if __name__ == "__main__":
    main()
