"""The OpenAI stand-in's optional latency_per_audio_second: an answer waits longer for longer audio."""

from __future__ import annotations

import io
import time
import wave

import requests

from tests.stack.openai_stub import OpenAIStub


def wav(seconds: float) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes(b"\0\0" * int(16_000 * seconds))
    return out.getvalue()


def answered_after(stub: OpenAIStub, seconds: float) -> float:
    request = requests.Request("POST", f"{stub.base_url}/audio/transcriptions",
                               headers={"Authorization": "Bearer sk-test"},
                               files={"file": ("a.wav", wav(seconds))}, data={"model": "whisper-1"}).prepare()
    started = time.monotonic()
    status, _, _ = stub.answer("/v1/audio/transcriptions", request.headers, request.body)  # type: ignore[arg-type]
    assert status == 200
    return time.monotonic() - started


def test_latency_grows_with_the_audio_only_when_asked() -> None:
    stub = OpenAIStub()
    try:
        assert answered_after(stub, 2.0) < 0.2  # off by default: every existing test keeps its timing
        stub.latency, stub.latency_per_audio_second = 0.05, 0.1
        short, long = answered_after(stub, 1.0), answered_after(stub, 3.0)
        assert short >= 0.15  # 0.05 + 0.1 x 1 s
        assert long >= 0.35  # 0.05 + 0.1 x 3 s
        assert long - short >= 0.15  # the 2 s more audio, not noise
    finally:
        stub.httpd.server_close()
