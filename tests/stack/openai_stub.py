"""An OpenAI-compatible `POST /v1/audio/transcriptions` (multipart) and `GET /v1/models`, built from the reference.

It refuses what the real API refuses and answers in the shapes it answers in. Every rule below cites
where it comes from (../shared/REALITY.md and docs/reality.md collect them); where the real behaviour is
unknown, the stand-in takes the strictest plausible reading and says so:

    auth       no `Authorization: Bearer` -> 401                             (API reference, Authentication)
    model      unknown -> 404 model_not_found                                (observed error shape, below)
    size       request body > 26214400 bytes -> 413 server_error             (buzz #381, speakr #42)
    format     response_format not taken by the model -> 400 (exact body)    (vercel/ai #8214; SDK docstring)
    granular.  timestamp_granularities[] without verbose_json -> 400         (SDK docstring; SubtitleEdit #11151)
    language   language / languages[] outside the API's 57 -> 400 invalid_language_format (jambonz PR #402)
    params     languages[]/keywords[] only for gpt-transcribe -> else 400    (SDK docstrings: "Supported by
               prompt refused by gpt-4o-transcribe-diarize -> 400             gpt-transcribe"; strictest reading)
               chunking_strategy required by diarize over 30 s -> 400
    file       extension not one of the formats, or not what the bytes are -> 400 "Invalid file format"
               (streamlit-mic-recorder #10, epicenter #357; a mismatch is refused: strictest reading)
    duration   gpt-4o-* (and, assumed, gpt-transcribe) over 1400 s -> 400 invalid_value  (speakr #168)
    replies    json: {text, usage} (+ languages for gpt-transcribe), no segments, no duration;
               verbose_json: {task, language, duration, text, segments, usage}   (types/audio/*.py)
    errors     {"error": {"message", "type", "param", "code"}}; 429 as rate_limit_exceeded or
               insufficient_quota; Retry-After / retry-after-ms as scripted   (error-codes guide; SDK)

Tests script it: `latency`, and `script`, a queue of `Reply`s served before normal answers.
`latency_per_audio_second` (default 0.0: off) adds that many seconds per second of audio received, so an
unscripted answer waits `latency + latency_per_audio_second * audio seconds`, like a real model whose
time grows with the audio (the benchmarks of long recordings set it; the default keeps every test as it was).
"""

from __future__ import annotations

import io
import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import PurePath
from typing import Any

import av

MAX_BODY = 26_214_400  # "Maximum content size limit (26214400) exceeded" (buzz #381)
FORMATS = ["flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "wav", "webm"]  # the 400's own list
# Demuxer names PyAV reports for each extension the API takes (what "the bytes are").
DEMUXERS = {"flac": {"flac"}, "m4a": {"mov,mp4,m4a,3gp,3g2,mj2"}, "mp4": {"mov,mp4,m4a,3gp,3g2,mj2"},
            "mp3": {"mp3"}, "mpeg": {"mp3", "mpeg"}, "mpga": {"mp3"}, "oga": {"ogg"}, "ogg": {"ogg"},
            "wav": {"wav"}, "webm": {"matroska,webm"}}


@dataclass(frozen=True)
class ModelRules:
    formats: frozenset[str]
    max_seconds: float | None = None
    languages: bool = False  # languages[] and keywords[]
    prompt: bool = True
    chunking_required_over: float | None = None
    usage: str = "duration"  # "duration" or "tokens"


_TEXT = frozenset({"json", "text"})
MODELS: dict[str, ModelRules] = {
    # Documented: json Transcription with `languages`; verbose_json not documented for it -> refused.
    "gpt-transcribe": ModelRules(_TEXT, 1400, languages=True),
    # "the only supported format is json" (SDK docstring); text also accepted (the 400's own advice).
    "gpt-4o-transcribe": ModelRules(_TEXT, 1400, usage="tokens"),
    "gpt-4o-mini-transcribe": ModelRules(_TEXT, 1400, usage="tokens"),
    "gpt-4o-mini-transcribe-2025-12-15": ModelRules(_TEXT, 1400, usage="tokens"),
    "gpt-4o-transcribe-diarize": ModelRules(_TEXT | {"diarized_json"}, 1400, prompt=False,
                                            chunking_required_over=30, usage="tokens"),
    "whisper-1": ModelRules(frozenset({"json", "text", "srt", "verbose_json", "vtt"})),
}
# The 57 languages the API takes (jambonz/jambonz-api-server PR #402, quoting the API's own error); a valid
# ISO-639-1 code outside them (`eo`, `ga`, `eu`) is refused with 400 `invalid_language_format`.
LANGUAGES = frozenset({"af", "ar", "az", "be", "bg", "bs", "ca", "cs", "cy", "da", "de", "el", "en", "es", "et",
                       "fa", "fi", "fr", "gl", "he", "hi", "hr", "hu", "hy", "id", "is", "it", "ja", "kk", "kn",
                       "ko", "lt", "lv", "mi", "mk", "mr", "ms", "ne", "nl", "no", "pl", "pt", "ro", "ru", "sk",
                       "sl", "sr", "sv", "sw", "ta", "th", "tl", "tr", "uk", "ur", "vi", "zh"})
# The name the API puts in its format error, e.g. 'gpt-4o-transcribe-api-ev3' (vercel/ai #8214).
SERVED_AS = {"gpt-4o-transcribe": "gpt-4o-transcribe-api-ev3"}


def error(message: str, *, type: str = "invalid_request_error", param: str | None = None,
          code: str | None = None) -> dict[str, Any]:
    """The API's error body."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# Default bodies for scripted statuses, each as the real API words it.
STATUS_BODIES: dict[int, dict[str, Any]] = {
    400: error("Invalid file format. Supported formats: " + repr(FORMATS)),
    401: error("Incorrect API key provided: sk-****.", code="invalid_api_key"),
    413: error(f"Maximum content size limit ({MAX_BODY}) exceeded (26306794 bytes read)", type="server_error"),
    429: error("Rate limit reached for requests. Please try again in 1s.", type="requests",
               code="rate_limit_exceeded"),
    500: error("The server had an error while processing your request. Sorry about that!", type="server_error"),
    503: error("The engine is currently overloaded, please try again later.", type="server_error"),
}


@dataclass
class TranscriptionRequest:
    fields: dict[str, str]  # single-valued form fields
    lists: dict[str, list[str]]  # array fields, by name without `[]` (timestamp_granularities, languages)
    filename: str
    data: bytes
    seconds: float | None = None  # the audio's length, once check() has measured it (measured once: CPU)

    @property
    def model(self) -> str:
        return self.fields.get("model", "")


@dataclass
class Reply:
    """A scripted answer; `body` is the error body (the real shape, or {"message": ...} filled in)."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    delay: float = 0.0  # seconds before answering (a slow upstream)

    @classmethod
    def rate_limited(cls, *, retry_after: str | None = None, retry_after_ms: str | None = None) -> Reply:
        headers = {k: v for k, v in (("retry-after", retry_after), ("retry-after-ms", retry_after_ms)) if v}
        return cls(429, headers)

    @classmethod
    def insufficient_quota(cls) -> Reply:
        # NextChat #3123 / #3664: same status as a rate limit, but billing; retrying does not help.
        return cls(429, body=error("You exceeded your current quota, please check your plan and billing details.",
                                   type="insufficient_quota", code="insufficient_quota"))

    def error_body(self) -> dict[str, Any]:
        if self.body and "error" in self.body:
            return self.body
        default = STATUS_BODIES.get(self.status, error(f"error {self.status}", type="server_error"))
        if self.body and "message" in self.body:
            return {"error": {**default["error"], "message": self.body["message"]}}
        return default


def audio_duration(data: bytes) -> float:
    """The audio's real length from its packets (not its header), or -1 when it does not decode."""
    info = probe(data)
    return info[1] if info else -1.0


def probe(data: bytes) -> tuple[str, float] | None:
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.audio[0]
            last = 0.0
            for packet in container.demux(stream):
                if packet.pts is not None and packet.time_base is not None:
                    last = max(last, float((packet.pts + (packet.duration or 0)) * packet.time_base))
            return container.format.name, last
    except Exception:  # noqa: BLE001 - the real API answers 400 for such a file
        return None


def parse_multipart(content_type: str, body: bytes) -> TranscriptionRequest:
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    fields: dict[str, str] = {}
    lists: dict[str, list[str]] = {}
    filename, data = "", b""
    for part in message.iter_parts():
        name = str(part.get_param("name", header="content-disposition") or "")
        payload = part.get_payload(decode=True) or b""
        if part.get_filename():
            filename, data = part.get_filename() or "", payload
        elif name.endswith("[]"):  # the SDK sends arrays as repeated `name[]` fields
            lists.setdefault(name[:-2], []).append(payload.decode())
        elif name:
            fields[name] = payload.decode()
    return TranscriptionRequest(fields, lists, filename, data)


def check(request: TranscriptionRequest) -> tuple[int, dict[str, Any]] | None:
    """The API's refusal of this request, or None when it would transcribe it."""
    model = request.model
    rules = MODELS.get(model)
    if rules is None:
        return 404, error(f"The model `{model}` does not exist or you do not have access to it.",
                          code="model_not_found")
    fmt = request.fields.get("response_format", "json")
    if fmt not in rules.formats:
        return 400, error(f"response_format '{fmt}' is not compatible with model '{SERVED_AS.get(model, model)}'. "
                          "Use 'json' or 'text' instead.", param="response_format", code="unsupported_value")
    if "timestamp_granularities" in request.lists and fmt != "verbose_json":
        return 400, error("`response_format` must be `verbose_json` if `timestamp_granularities[]` is provided",
                          param="timestamp_granularities")
    refusal = check_hints(request, rules)
    if refusal:
        return refusal
    extension = PurePath(request.filename).suffix.lower().lstrip(".")
    info = probe(request.data)
    if extension not in FORMATS or info is None or info[0] not in DEMUXERS[extension]:
        return 400, STATUS_BODIES[400]
    seconds = request.seconds = info[1]
    if rules.max_seconds is not None and seconds > rules.max_seconds:
        return 400, error(f"audio duration {seconds} seconds is longer than {rules.max_seconds:.0f} seconds "
                          "which is the maximum for this model", code="invalid_value")
    if rules.chunking_required_over and seconds > rules.chunking_required_over \
            and "chunking_strategy" not in request.fields:
        return 400, error("chunking_strategy is required for audio longer than 30 seconds", param="chunking_strategy")
    return None


def check_hints(request: TranscriptionRequest, rules: ModelRules) -> tuple[int, dict[str, Any]] | None:
    """The API's refusal of the optional hints (languages, keywords, prompt), or None."""
    model = request.model
    for name in ("languages", "keywords"):
        if name in request.lists and not rules.languages:
            return 400, error(f"`{name}` is not supported with model '{model}'.", param=name,
                              code="unsupported_parameter")
    for name, values in (("language", [request.fields["language"]] if "language" in request.fields else []),
                         ("languages", request.lists.get("languages", []))):
        for value in values:
            if value not in LANGUAGES:  # the body as public clients quote it; its param/code: likely, unverified
                return 400, error(f"Invalid language '{value}'. Language parameter must be specified in ISO-639-1 "
                                  "format.", param=name, code="invalid_language_format")
    if "prompt" in request.fields and not rules.prompt:
        return 400, error(f"prompt is not supported with model '{model}'.", param="prompt",
                          code="unsupported_parameter")
    return None


def transcription(request: TranscriptionRequest) -> dict[str, Any]:
    """A reply in the shape the model's response_format has (types/audio/transcription*.py)."""
    rules = MODELS[request.model]
    seconds = max(request.seconds if request.seconds is not None else audio_duration(request.data), 0.0)
    text = f"transcript of {request.filename} ({len(request.data)} bytes)"
    # whisper-1 and gpt-transcribe are billed by the second and report it as a whole number (speakr #42
    # shows 'seconds': 0); gpt-4o-* report tokens.
    usage: dict[str, Any] = ({"type": "duration", "seconds": math.ceil(seconds)} if rules.usage == "duration" else
                             {"type": "tokens", "input_tokens": int(seconds * 10), "output_tokens": len(text) // 4,
                              "total_tokens": int(seconds * 10) + len(text) // 4})
    if request.fields.get("response_format") != "verbose_json":
        reply: dict[str, Any] = {"text": text, "usage": usage}
        if rules.languages:
            reply["languages"] = [{"code": (request.lists.get("languages") or ["en"])[0], "seconds": seconds}]
        return reply
    half = seconds / 2
    segment = {"seek": 0, "tokens": [], "temperature": 0.0, "avg_logprob": -0.1, "compression_ratio": 1.0,
               "no_speech_prob": 0.01}
    return {"task": "transcribe", "language": "english", "duration": seconds, "text": text, "usage": usage,
            "segments": [{"id": 0, "start": 0.0, "end": half, "text": "first half", **segment},
                         {"id": 1, "start": half, "end": seconds, "text": "second half", **segment}]}


class OpenAIStub:
    """Run with `start()`; point the SDK at `base_url`."""

    def __init__(self) -> None:
        self.requests: list[TranscriptionRequest] = []  # every transcription request that reached the model
        self.refused: list[tuple[TranscriptionRequest, int, dict[str, Any]]] = []  # and those refused
        self.script: deque[Reply] = deque()
        self.latency = 0.0  # seconds every unscripted answer waits
        self.latency_per_audio_second = 0.0  # plus this much per second of the audio received (0: off)
        self.on_request: Callable[[TranscriptionRequest], None] | None = None
        self.in_flight = 0  # transcription requests being answered now
        self.peak_in_flight = 0  # the most ever answered at once
        self.lock = threading.Lock()
        self.release = threading.Event()  # set to cut every pending delay short (test teardown)
        self.lists_models = True  # False: GET /models answers 404, as faster-whisper-server does
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else each reply waits ~40 ms for a delayed ACK

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models") and not stub.lists_models:
                    # faster-whisper-server has no GET /v1/models: its 404 body (docs/reality.md).
                    self._json(404, {"detail": "Not Found"})
                elif self.path.rstrip("/").endswith("/models"):
                    data = [{"id": m, "object": "model", "owned_by": "system"} for m in MODELS]
                    self._json(200, {"object": "list", "data": data})
                else:
                    self._json(404, error(f"Invalid URL (GET {self.path})"))

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._json(*stub.answer(self.path, self.headers, body))

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

    def answer(self, path: str, headers: Any, body: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Status, JSON body and headers for one POST, after the scripted delay."""
        # The delay runs from the request's receipt, as a real server's latency does: this stand-in's own
        # parsing and measuring (CPU of the machine under test, GIL-bound when many parts arrive at once)
        # is part of the modelled latency, not added to it.
        received = time.monotonic()
        if not path.endswith("/audio/transcriptions"):
            return 404, error(f"Invalid URL (POST {path})"), {}
        if not (headers.get("Authorization") or "").startswith("Bearer "):
            return 401, error("You didn't provide an API key."), {}
        request = parse_multipart(headers["Content-Type"], body)
        refusal = (413, STATUS_BODIES[413]) if len(body) > MAX_BODY else check(request)
        if refusal:
            with self.lock:
                self.refused.append((request, *refusal))
            return *refusal, {}
        with self.lock:
            self.requests.append(request)
            scripted = self.script.popleft() if self.script else None
            latency, per_second = self.latency, self.latency_per_audio_second
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            return self._answer(request, scripted, latency, per_second, received)
        finally:
            with self.lock:
                self.in_flight -= 1

    def _answer(self, request: TranscriptionRequest, scripted: Reply | None, latency: float,
                per_second: float, received: float) -> tuple[int, dict[str, Any], dict[str, str]]:
        if scripted is not None:
            reply = scripted
        elif per_second:  # the audio's length, measured from its packets as check() did
            measured = request.seconds if request.seconds is not None else audio_duration(request.data)
            reply = Reply(delay=latency + per_second * max(measured, 0.0))
        else:
            reply = Reply(delay=latency)
        if self.on_request:
            self.on_request(request)
        if reply.delay:
            self.release.wait(max(0.0, reply.delay - (time.monotonic() - received)))
        if reply.status != 200:
            return reply.status, reply.error_body(), reply.headers
        return 200, transcription(request), {}

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
