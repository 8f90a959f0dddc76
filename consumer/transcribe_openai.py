"""The OpenAI transcription backend: what each model is asked for, how its reply is read, and its errors.

Each model is asked only for what its API reference documents (`MODELS`; the sources are listed in
../shared/REALITY.md and beside each row):

    model                     response_format  language hint  prompt  per request
    gpt-transcribe            json             languages[]    yes     <= 1400 s (assumed)
    gpt-4o(-mini)-transcribe  json             language       yes     <= 1400 s
    gpt-4o-transcribe-diarize json             language       no      <= 1400 s, chunking_strategy
    whisper-1                 verbose_json     language       yes     25 MB only
    any other (a compatible  json, or verbose_json when TRANSCRIBE_RESPONSE_FORMAT=verbose_json
    server's own names)

(`keywords[]`, which gpt-transcribe takes, is not sent: no job field carries keywords.)

A `verbose_json` reply carries timed segments; a `json` reply carries only text (and `usage`), so its
transcript gets one segment per part sent, spanning the part's measured start and end (coarse, and
documented as such in docs/contract.md). Durations come from our own measurement of the audio, else the
reply's `usage.seconds`; never from a field the model does not send.

A 400 that names one of *our* optional parameters (`param` in the error body) is not the recording's
fault: the parameter is left out (or `verbose_json` falls back to `json`) and the request is sent again
at once. A parameter set by our configuration (`response_format`, `chunking_strategy`) is then left out
for the life of the process; one that carries the job's value (`language`, `languages`, `prompt`: the
API refuses a language it does not support, e.g. `eo`) only for that request. A 400 naming
a parameter we cannot drop (`model`) keeps the job (`transcription_misconfigured`, retryable and
alerted on). Only a 400 about the file itself (`param` `file` or none) fails the job.

The SDK's exceptions are translated into the project's error tree by `OPENAI_ERRORS` / `OPENAI_STATUS`,
here and nowhere else.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Literal

import openai

from consumer.errors import ConsumerError, PermanentError, RetryableError
from consumer.models import Segment, Transcript
from consumer.transcribe import AudioLimits, AudioPart

log = logging.getLogger(__name__)

ResponseFormat = Literal["auto", "json", "verbose_json"]
DURATION_MARGIN = 0.9  # under a model's duration cap: clear of rounding on the API's side


@dataclass(frozen=True)
class ModelProfile:
    """What one model is documented to take and give."""

    response_format: Literal["json", "verbose_json"]
    max_seconds: float | None = None  # longest audio in one request (None: only the 25 MB limit)
    languages_param: bool = False  # the language hint goes as `languages[]` (gpt-transcribe), not `language`
    prompt: bool = True
    chunking_strategy: bool = False  # needs chunking_strategy over 30 s (diarize): always sent, as auto


MODELS: dict[str, ModelProfile] = {
    # json Transcription {text, languages, usage}; languages[] "Supported by gpt-transcribe" (SDK
    # docstrings). Its duration cap is not documented: assumed to be the gpt-4o models' 1400 s.
    "gpt-transcribe": ModelProfile("json", 1400, languages_param=True),
    # "For gpt-4o-transcribe and gpt-4o-mini-transcribe, the only supported format is json" (SDK docstring
    # of response_format; the 400 is quoted in vercel/ai #8214). 1400 s cap: Scriberr #477, speakr #168.
    "gpt-4o-transcribe": ModelProfile("json", 1400),
    "gpt-4o-mini-transcribe": ModelProfile("json", 1400),
    "gpt-4o-mini-transcribe-2025-12-15": ModelProfile("json", 1400),
    # prompt "not supported when using gpt-4o-transcribe-diarize"; chunking_strategy "Required ... for
    # inputs longer than 30 seconds" (SDK docstrings).
    "gpt-4o-transcribe-diarize": ModelProfile("json", 1400, prompt=False, chunking_strategy=True),
    # verbose_json with segment timestamps (SDK docstring of timestamp_granularities); no duration cap.
    "whisper-1": ModelProfile("verbose_json"),
}
OTHER_MODEL = ModelProfile("json")  # an OpenAI-compatible server's model: ask for the one universal format

# Parameters we may leave out when the endpoint refuses them; anything else it names is not droppable.
# `response_format`/`timestamp_granularities` refused means: fall back to json.
DROPPABLE = frozenset({"response_format", "timestamp_granularities", "prompt", "language", "languages",
                       "chunking_strategy"})
# Of those, the ones whose value comes from the job: a 400 may be about that one value (a language the API
# does not support, e.g. `eo`), so the parameter is left out of that request only, never for later jobs.
JOB_VALUES = frozenset({"prompt", "language", "languages"})

# openai exception class -> (retryable?, code). Looked up along the MRO, most specific first.
OPENAI_ERRORS: dict[type[Exception], tuple[bool, str]] = {
    openai.RateLimitError: (True, "rate_limited"),
    openai.APITimeoutError: (True, "transcription_unavailable"),
    openai.APIConnectionError: (True, "transcription_unavailable"),
    openai.InternalServerError: (True, "transcription_unavailable"),
    # The deployment's fault (key, project, base URL, model name): keep the job until someone fixes it.
    openai.AuthenticationError: (True, "transcription_misconfigured"),
    openai.PermissionDeniedError: (True, "transcription_misconfigured"),
    openai.ConflictError: (True, "transcription_unavailable"),
    openai.BadRequestError: (False, "transcription_rejected"),
    openai.UnprocessableEntityError: (False, "transcription_rejected"),
    openai.NotFoundError: (True, "transcription_misconfigured"),  # a mistyped model or URL
    openai.APIStatusError: (True, "transcription_unavailable"),
}
# Statuses not covered by an SDK subclass: 413 is too large (permanent), 408/425 are transient.
OPENAI_STATUS: dict[int, tuple[bool, str]] = {
    413: (False, "audio_too_large"),
    408: (True, "transcription_unavailable"),
    425: (True, "transcription_unavailable"),
}
# 429 `code`s that are not a rate limit: billing (OpenAI error-codes guide). Waiting does not help.
QUOTA_CODES = frozenset({"insufficient_quota"})


def _retry_after(exc: openai.APIStatusError) -> float | None:
    headers = exc.response.headers
    for name in ("retry-after-ms", "retry-after"):
        value = headers.get(name)
        if value:
            try:
                seconds = float(value)
            except ValueError:
                continue
            return seconds / 1000 if name.endswith("-ms") else seconds
    return None


def refused_param(exc: openai.OpenAIError) -> str | None:
    """The request parameter a 400 names (`error.param`), without the `[]` of array fields."""
    if not isinstance(exc, openai.BadRequestError):
        return None
    param = getattr(exc, "param", None)
    return param.removesuffix("[]") if isinstance(param, str) and param else None


def translate_openai_error(exc: openai.OpenAIError) -> ConsumerError:
    """Map an OpenAI SDK exception to RetryableError/PermanentError by the tables above."""
    status = getattr(exc, "status_code", None)
    if status in OPENAI_STATUS:
        retryable, code = OPENAI_STATUS[status]
    else:
        retryable, code = next(
            (OPENAI_ERRORS[k] for k in type(exc).__mro__ if k in OPENAI_ERRORS),
            (True, "transcription_unavailable"),
        )
    if isinstance(exc, openai.RateLimitError) and getattr(exc, "code", None) in QUOTA_CODES:
        code = "quota_exceeded"
    param = refused_param(exc)
    if param and param != "file":  # our request, not the recording: keep the job until it is fixed
        retryable, code = True, "transcription_misconfigured"
    detail = f"OpenAI {status}: {exc}" if status else f"OpenAI: {exc}"
    if retryable:
        delay = _retry_after(exc) if isinstance(exc, openai.APIStatusError) else None
        return RetryableError(detail, code=code, delay=delay)
    return PermanentError(detail, code=code)


class OpenAITranscriber:
    """The OpenAI transcription API (or any compatible server) through the official SDK."""

    source = "api"  # sidecar_transcriptions{source}: an API call (billed on api.openai.com)
    parts_at_once: int | None = None  # the API runs every part we send at once: TRANSCRIBE_PARALLELISM decides

    def __init__(self, client: openai.OpenAI, *, model: str, response_format: ResponseFormat = "auto") -> None:
        self.client = client
        self.model = model
        self.profile = MODELS.get(model, OTHER_MODEL)
        self.response_format = self.profile.response_format if response_format == "auto" else response_format
        cap = self.profile.max_seconds
        self.limits = AudioLimits(max_seconds=cap * DURATION_MARGIN if cap else None)
        self.supports_prompt = self.profile.prompt
        self._refused: dict[str, str] = {}  # every parameter the endpoint refused so far -> its 400
        self._skipped: set[str] = set()  # those left out of every request from now on (our configuration's)
        self._lock = threading.Lock()

    @property
    def refused(self) -> dict[str, str]:
        """The optional parameters this endpoint refused so far, each with the API's own error."""
        with self._lock:
            return dict(self._refused)

    def request(self, part: AudioPart, *, language: str | None, prompt: str | None) -> dict[str, Any]:
        """The keyword arguments of the SDK call for one part (less the file): the model's documented shape."""
        kwargs: dict[str, Any] = {"model": self.model}
        with self._lock:
            skipped = set(self._skipped)
        verbose = self.response_format == "verbose_json" and "timestamp_granularities" not in skipped
        kwargs["response_format"] = "verbose_json" if verbose else "json"
        if verbose:
            kwargs["timestamp_granularities"] = ["segment"]
        if language:
            if self.profile.languages_param:
                kwargs["languages"] = [language]
            else:
                kwargs["language"] = language
        if prompt and self.profile.prompt:
            kwargs["prompt"] = prompt
        if self.profile.chunking_strategy:
            kwargs["chunking_strategy"] = "auto"
        return {k: v for k, v in kwargs.items() if k not in skipped}

    def transcribe(self, part: AudioPart, *, language: str | None, prompt: str | None) -> Transcript:
        dropped: set[str] = set()  # left out of this part's request only
        for _ in range(len(DROPPABLE) + 1):  # each refusal drops one more parameter: this ends
            kwargs = {k: v for k, v in self.request(part, language=language, prompt=prompt).items()
                      if k not in dropped}
            try:
                with part.path.open("rb") as fh:
                    result = self.client.audio.transcriptions.create(file=(part.filename, fh), **kwargs)
                return self._read(result, kwargs["response_format"], part, language)
            except openai.OpenAIError as exc:
                param = refused_param(exc)
                if param not in DROPPABLE or not self._refuse(param, kwargs, exc, dropped):
                    raise translate_openai_error(exc) from exc
        raise RetryableError("the endpoint refused every optional parameter", code="transcription_misconfigured")

    def _refuse(self, param: str, sent: dict[str, Any], exc: openai.OpenAIError, dropped: set[str]) -> bool:
        """Leave `param` out (of this request if it carries the job's value, else of every request from now
        on); False when leaving it out changes nothing we send."""
        if param == "response_format":
            param = "timestamp_granularities" if sent.get("response_format") == "verbose_json" else param
        if param not in sent or param == "response_format":
            return False  # json itself refused, or a parameter we did not send: nothing left to fall back to
        per_job = param in JOB_VALUES
        with self._lock:
            self._refused[param] = str(exc)
            if not per_job:
                self._skipped.add(param)
        dropped.add(param)
        log.warning("transcription_param_refused", extra={
            "model": self.model, "param": param, "api_error": str(exc),
            "value": sent.get(param) if param in ("language", "languages") else None,
            "fallback": "json without timestamps" if param == "timestamp_granularities"
            else f"{param} left out of this request" if per_job else f"{param} left out from now on"})
        return True

    def _read(self, result: Any, response_format: str, part: AudioPart, language: str | None) -> Transcript:
        data = result.model_dump() if hasattr(result, "model_dump") else dict(result)
        text = str(data.get("text") or "").strip()
        usage = data.get("usage") or {}
        measured = part.duration if part.duration is not None else (
            float(usage["seconds"]) if usage.get("type") == "duration" and "seconds" in usage else None)
        if response_format == "verbose_json":
            segments = [Segment(start=float(s.get("start", 0)), end=float(s.get("end", 0)), text=str(s.get("text", "")))
                        for s in (data.get("segments") or [])]
            detected = data.get("language")
        else:
            # json has no timestamps: one segment for the whole part, from what we measured.
            segments = [Segment(start=0.0, end=measured or 0.0, text=text)] if text else []
            spoken = sorted(data.get("languages") or [], key=lambda lang: -float(lang.get("seconds") or 0))
            detected = spoken[0].get("code") if spoken else None
        return Transcript(text=text, language=detected or language, duration_seconds=measured, segments=segments)
