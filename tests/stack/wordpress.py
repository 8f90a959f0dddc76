"""A stand-in WordPress `upload-complete` endpoint that records every callback as it arrived on the wire."""

from __future__ import annotations

import json
import threading
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CALLBACK_PATH = "/wp-json/salestrainer/v1/upload-complete"


@dataclass
class Callback:
    path: str
    headers: dict[str, str]
    raw: bytes
    status_returned: int

    @property
    def body(self) -> dict[str, Any]:
        return dict(json.loads(self.raw))


class WordPressStub:
    """Answers 200 unless `statuses` holds canned answers (served first, in order).

    With `hold` set, every callback waits (counted in `held`) until `release` is set: a callback on the wire.
    `delays` holds seconds to wait *after* a callback is taken in, before answering (served first, in
    order): WordPress that stored the transcript but answers after the daemon's timeout.
    """

    def __init__(self) -> None:
        self.received: list[Callback] = []
        self.statuses: deque[int] = deque()
        self.delays: deque[float] = deque()
        self.lock = threading.Lock()
        self.hold = False
        self.held = 0
        self.release = threading.Event()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if stub.hold:
                    with stub.lock:
                        stub.held += 1
                    stub.release.wait(60)
                with stub.lock:
                    status = stub.statuses.popleft() if stub.statuses else 200
                    delay = stub.delays.popleft() if stub.delays else 0.0
                    stub.received.append(Callback(self.path, {k.lower(): v for k, v in self.headers.items()},
                                                  raw, status))
                if delay:
                    stub.release.wait(delay)
                reply = b'{"ok":true}' if status == 200 else b'{"ok":false}'
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "http://127.0.0.1:9/elsewhere")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}{CALLBACK_PATH}"

    def start(self) -> WordPressStub:
        threading.Thread(target=self.httpd.serve_forever, name="wordpress-stub", daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def accepted(self) -> list[dict[str, Any]]:
        """Bodies of the callbacks answered 2xx."""
        with self.lock:
            return [c.body for c in self.received if 200 <= c.status_returned < 300]

    def terminal(self, job_id: str) -> list[dict[str, Any]]:
        return [b for b in self.accepted() if b["job_id"] == job_id]
