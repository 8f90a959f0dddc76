"""A small OpenAI-compatible server: POST /v1/audio/transcriptions (multipart) and GET /v1/models.

It records every request, measures the uploaded audio with PyAV (so durations are real), and can be
scripted: a latency, and a queue of canned failures (status, headers) served before normal answers.
"""

from __future__ import annotations

import io
import json
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import av


@dataclass
class TranscriptionRequest:
    fields: dict[str, str]
    filename: str
    data: bytes

    @property
    def model(self) -> str:
        return self.fields.get("model", "")


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    delay: float = 0.0  # seconds before answering (a slow upstream)


def audio_duration(data: bytes) -> float:
    try:
        with av.open(io.BytesIO(data)) as container:
            if container.duration:
                return float(container.duration / 1_000_000)
            stream = container.streams.audio[0]
            last = 0.0
            for packet in container.demux(stream):
                if packet.pts is not None and packet.time_base is not None:
                    last = max(last, float((packet.pts + (packet.duration or 0)) * packet.time_base))
            return last
    except Exception:  # noqa: BLE001 - the real API would answer 400 for such a file
        return -1.0


def parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, str], str, bytes]:
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    fields: dict[str, str] = {}
    filename, data = "", b""
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if part.get_filename():
            filename, data = part.get_filename() or "", payload
        elif name:
            fields[str(name)] = payload.decode()
    return fields, filename, data


class OpenAIStub:
    """Run with `start()`; point the SDK at `base_url`."""

    def __init__(self) -> None:
        self.requests: list[TranscriptionRequest] = []
        self.script: deque[Reply] = deque()
        self.latency = 0.0
        self.on_request: Callable[[TranscriptionRequest], None] | None = None
        self.lock = threading.Lock()
        self.release = threading.Event()  # set to cut every pending delay short (test teardown)
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._json(200, {"object": "list", "data": [{"id": "gpt-transcribe", "object": "model"}]})
                else:
                    self._json(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                if not self.path.endswith("/audio/transcriptions"):
                    self._json(404, {"error": {"message": "not found"}})
                    return
                fields, filename, data = parse_multipart(self.headers["Content-Type"], body)
                request = TranscriptionRequest(fields, filename, data)
                with stub.lock:
                    stub.requests.append(request)
                    reply = stub.script.popleft() if stub.script else Reply(delay=stub.latency)
                if stub.on_request:
                    stub.on_request(request)
                if reply.delay:
                    stub.release.wait(reply.delay)
                if reply.status != 200:
                    message = (reply.body or {}).get("message", f"stub error {reply.status}")
                    self._json(reply.status, {"error": {"message": message, "type": "stub"}}, reply.headers)
                    return
                self._json(200, reply.body or stub.transcript(request))

            def _json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                raw = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(raw)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @staticmethod
    def transcript(request: TranscriptionRequest) -> dict[str, Any]:
        duration = audio_duration(request.data)
        text = f"transcript of {request.filename} ({len(request.data)} bytes)"
        half = max(duration, 0.0) / 2
        return {
            "task": "transcribe", "language": request.fields.get("language") or "english", "duration": duration,
            "text": text,
            "segments": [
                {"id": 0, "start": 0.0, "end": half, "text": "first half", "seek": 0, "tokens": [], "temperature": 0.0,
                 "avg_logprob": -0.1, "compression_ratio": 1.0, "no_speech_prob": 0.01},
                {"id": 1, "start": half, "end": max(duration, 0.0), "text": "second half", "seek": 0, "tokens": [],
                 "temperature": 0.0, "avg_logprob": -0.1, "compression_ratio": 1.0, "no_speech_prob": 0.01},
            ],
        }

    def start(self) -> OpenAIStub:
        threading.Thread(target=self.httpd.serve_forever, name="openai-stub", daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def count(self) -> int:
        with self.lock:
            return len(self.requests)
