"""`sidecar intake`: the old sidecar's HTTP front door, kept so WordPress can move to the queue unchanged.

WordPress (wp-custom) calls the old service synchronously: `POST /transcribe` with `{"s3_key": ...}`
(or, in the FastAPI version, `POST /process-s3` with `{"object_key", "session_id", "scenario_id",
"secret"}`), authenticated by SIDE_CAR_SECRET. This server takes exactly those calls, turns each into
a job signed as docs/contract.md says, puts it on SQS_QUEUE_URL and answers 202 with the job_id; the
daemon does the rest and calls WordPress back. It holds no state (restart it any time) and never
transcribes. Off unless started, on 127.0.0.1 by default.

    POST /transcribe, POST /process-s3   202 {"ok": true, "status": "queued", "job_id", "message_id"}
    GET  /health                         200 {"status": "ok", "version"}
    errors                               one line of JSON, {"error": <code>, "message": <why>}:
                                         400 bad body, 401 secret, 404, 405, 411, 413, 503 queue down

The secret is read from `Authorization: Bearer`, the INTAKE_SECRET_HEADER header and the
INTAKE_SECRET_FIELD body field (where the old service read it), and compared with every configured
secret in constant time. A body is checked with the daemon's own parser before it is sent, so a job
the daemon would reject is a 400 here, not a dead letter later.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from consumer import __version__
from consumer.errors import ConsumerError, InvalidMessageError
from consumer.ops import signed_job
from consumer.sqs import Message, SqsQueue
from consumer.validate import MAX_BODY_BYTES, parse_job

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

    from consumer.settings import Settings

log = logging.getLogger("consumer.intake")

ROUTES = ("/transcribe", "/process-s3")
# Fields of the old bodies passed on to the job (the contract's names; `object_key` is the FastAPI
# version's name for s3_key). Anything else, the secret above all, stays out of the job.
JOB_FIELDS = ("job_id", "s3_key", "s3_bucket", "language", "prompt", "metadata")
# The FastAPI version's identifiers for WordPress, echoed back in the callback's metadata.
OLD_METADATA = ("session_id", "scenario_id")
READ_TIMEOUT = 15  # seconds a client may take to send its request: a stalled one must not hold a thread


class RejectedError(Exception):
    """A request intake answers with an error status and one line saying why."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def secret_matches(candidates: list[str], secrets: list[str]) -> bool:
    """True when any candidate equals any secret; every pair is compared, in constant time each."""
    matched = False
    for secret in secrets:
        for candidate in candidates:
            matched |= hmac.compare_digest(candidate.encode(), secret.encode())
    return matched


def job_body(data: dict[str, Any]) -> dict[str, Any]:
    """The contract-v1 job for an old request body: its fields passed on, a job_id made when it has none."""
    body = {name: data[name] for name in JOB_FIELDS if name in data}
    if "s3_key" not in body and "object_key" in data:
        body["s3_key"] = data["object_key"]
    if "s3_key" not in body:
        raise RejectedError(400, "invalid_request", "s3_key is required")
    body.setdefault("job_id", f"intake-{uuid.uuid4().hex}")
    old = {name: data[name] for name in OLD_METADATA if name in data}
    if old:
        metadata = body.get("metadata")
        if metadata in (None, []):
            metadata = {}
        if isinstance(metadata, dict):  # anything else is left for the parser to reject
            body["metadata"] = {**old, **metadata}
    return body


class Intake:
    """What one POST does: authenticate, build, check and send the job. Independent of HTTP."""

    def __init__(self, settings: Settings, sqs: SQSClient) -> None:
        self.settings = settings
        self.queue = SqsQueue(sqs, settings.sqs_queue_url or "")

    def authenticate(self, headers: Any, data: Any) -> None:
        candidates = []
        auth = headers.get("Authorization") or ""
        if auth[:7].lower() == "bearer ":
            candidates.append(auth[7:].strip())
        header = self.settings.intake_secret_header
        if header and headers.get(header) is not None:
            candidates.append(headers.get(header))
        field = self.settings.intake_secret_field
        if field and isinstance(data, dict) and isinstance(data.get(field), str):
            candidates.append(data[field])
        if not candidates:
            raise RejectedError(401, "unauthorized", "no secret (Authorization: Bearer, "
                            f"{header or '-'} header or {field or '-'} field)")
        if not secret_matches(candidates, self.settings.secrets):
            raise RejectedError(401, "unauthorized", "wrong secret")

    def submit(self, headers: Any, raw: bytes) -> dict[str, str]:
        """Turn one request body into a queued job; raise RejectedError saying why not."""
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            data = None
        self.authenticate(headers, data)  # first: an unauthenticated caller learns nothing about bodies
        if not isinstance(data, dict):
            raise RejectedError(400, "invalid_request", "body must be a JSON object")
        body, attributes = signed_job(self.settings, job_body(data))
        try:
            job = parse_job(Message(message_id="intake", receipt_handle="", body=body, attributes=attributes),
                            self.settings)
        except InvalidMessageError as exc:
            raise RejectedError(400, exc.code, exc.message) from None
        try:
            message_id = self.queue.send(body, attributes)
        except ConsumerError as exc:
            log.error("intake_queue_unavailable", extra={"job_id": job.job_id, "error": str(exc)})
            raise RejectedError(503, "queue_unavailable", "the job queue cannot be reached; try again") from None
        return {"job_id": job.job_id, "message_id": message_id, "s3_key": job.s3_key}


class IntakeServer:
    """Serves the old routes on INTAKE_HOST:INTAKE_PORT from a background thread."""

    def __init__(self, intake: Intake, *, host: str, port: int) -> None:
        class Handler(_Handler):
            pass

        Handler.intake = intake
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="intake", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> IntakeServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    intake: Intake
    server_version = f"salestrainer-sidecar-intake/{__version__}"
    disable_nagle_algorithm = True  # small JSON answers: do not wait for an ACK before sending them
    timeout = READ_TIMEOUT

    def do_GET(self) -> None:
        if self._path() == "/health":
            self._reply(200, {"status": "ok", "version": __version__})
        elif self._path() in ROUTES:
            self._reply(405, {"error": "method_not_allowed", "message": "use POST"}, allow="POST")
        else:
            self._reply(404, {"error": "not_found", "message": f"no route {self._path()[:100]}"})

    def do_POST(self) -> None:
        started = time.monotonic()
        try:
            if self._path() not in ROUTES:
                raise RejectedError(404, "not_found", f"no route {self._path()[:100]}")
            sent = self.intake.submit(self.headers, self._body())
        except RejectedError as exc:
            level = logging.ERROR if exc.status >= 500 else logging.WARNING
            log.log(level, "intake_rejected", extra={"status": exc.status, "error_code": exc.code,
                                                     "error": exc.message, "client": self.client_address[0]})
            self._reply(exc.status, {"error": exc.code, "message": exc.message})
            return
        except Exception:  # a bug: logged with its traceback, the caller gets one line
            log.exception("intake_crashed", extra={"client": self.client_address[0]})
            self._reply(500, {"error": "internal_error", "message": "unexpected error; see the intake log"})
            return
        log.info("intake_job_queued", extra={**sent, "duration_s": round(time.monotonic() - started, 3)})
        self._reply(202, {"ok": True, "status": "queued", "job_id": sent["job_id"],
                          "message_id": sent["message_id"]})

    def do_PUT(self) -> None:
        self._wrong_method()

    def do_DELETE(self) -> None:
        self._wrong_method()

    def do_PATCH(self) -> None:
        self._wrong_method()

    def _wrong_method(self) -> None:
        if self._path() in (*ROUTES, "/health"):
            allow = "GET" if self._path() == "/health" else "POST"
            self._reply(405, {"error": "method_not_allowed", "message": f"use {allow}"}, allow=allow)
        else:
            self._reply(404, {"error": "not_found", "message": f"no route {self._path()[:100]}"})


    def _path(self) -> str:
        return self.path.split("?", 1)[0]

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise RejectedError(411, "length_required", "send Content-Length, not chunked transfer encoding")
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            raise RejectedError(411, "length_required", "Content-Length is required")
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True  # the body is not read, so the connection cannot be reused
            raise RejectedError(413, "body_too_large", f"body is larger than {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(int(length))
        if len(raw) < int(length):
            raise RejectedError(400, "invalid_request", "body shorter than Content-Length")
        return raw

    def _reply(self, status: int, body: dict[str, Any], *, allow: str | None = None) -> None:
        data = (json.dumps(body) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if allow:
            self.send_header("Allow", allow)
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (a malformed request line, headers too long, 501) as one line of JSON."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # an unreadable request line: still answer with a status line
            self.request_version = "HTTP/1.0"
        self._reply(code, {"error": "bad_request" if code < 500 else "not_implemented",
                           "message": (message or self.responses.get(code, ("",))[0])[:200]})

    def log_message(self, format: str, *args: Any) -> None:
        pass  # every request is logged once, as an event, by the handlers above
