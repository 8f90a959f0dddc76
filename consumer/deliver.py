"""The deliver stage: the WordPress callback, POSTed exactly as the old sidecar did.

The token travels in the JSON body (`server_token`) and, when enabled, in `X-Server-Token`; never in an
`Authorization` header, which the WAF in front of WordPress strips. Only 2xx is success; redirects are
not followed (a redirect would carry the token somewhere the configuration did not name).
"""

from __future__ import annotations

import contextlib
import json

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from consumer import __version__
from consumer.errors import ConsumerError, PermanentError, RetryableError
from consumer.models import CallbackPayload

USER_AGENT = f"salestrainer-sidecar/{__version__}"
MAX_RESPONSE_BYTES = 64 * 1024

# Status -> (retryable, code). Anything else 4xx is a rejection, anything else 5xx transient.
CALLBACK_STATUS: dict[int, tuple[bool, str]] = {
    # A misconfigured endpoint (token, route, plugin off) answers every job alike: a deployment problem,
    # retried with backoff (without spending a job's receives) and alerted on, never a reason to fail jobs.
    401: (True, "callback_misconfigured"),
    403: (True, "callback_misconfigured"),
    404: (True, "callback_misconfigured"),
    408: (True, "callback_unavailable"),
    409: (True, "callback_unavailable"),
    425: (True, "callback_unavailable"),
    429: (True, "callback_unavailable"),
}


def make_session(*, retries: int = 2) -> requests.Session:
    """A Session with urllib3's Retry for quick in-attempt retries of connection errors and 502-504.

    POST is retried on purpose: every callback carries `Idempotency-Key`, and WordPress dedupes on job_id.
    Longer outages are left to SQS redelivery with backoff.
    """
    retry = Retry(
        total=retries, connect=retries, read=0, status=retries,
        status_forcelist=(502, 503, 504), allowed_methods=frozenset({"POST"}),
        backoff_factor=0.5, backoff_max=5, respect_retry_after_header=False, raise_on_status=False,
    )
    session = requests.Session()
    session.mount("https://", HTTPAdapter(max_retries=retry, pool_maxsize=32))
    session.mount("http://", HTTPAdapter(max_retries=retry, pool_maxsize=32))
    session.trust_env = False  # a proxy from the environment must not see the token
    return session


def classify_status(status: int) -> ConsumerError | None:
    """None for 2xx, else the error that status means."""
    if 200 <= status < 300:
        return None
    retryable, code = CALLBACK_STATUS.get(
        status, (status >= 500, "callback_unavailable" if status >= 500 else "callback_rejected")
    )
    if 300 <= status < 400:
        retryable, code = False, "callback_rejected"
    message = f"WordPress answered HTTP {status}"
    return RetryableError(message, code=code) if retryable else PermanentError(message, code=code)


class Deliverer:
    """POSTs callback payloads to the one configured URL."""

    def __init__(self, session: requests.Session, url: str, *, send_token_header: bool, timeout: float) -> None:
        self.session = session
        self.url = url
        self.send_token_header = send_token_header
        self.timeout = timeout

    def headers(self, payload: CallbackPayload) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": payload.job_id,
            "User-Agent": USER_AGENT,
        }
        if self.send_token_header:
            headers["X-Server-Token"] = payload.server_token
        return headers

    def post(self, payload: CallbackPayload) -> None:
        """Deliver one callback; raise RetryableError/PermanentError unless WordPress answered 2xx."""
        body = json.dumps(payload.model_dump(mode="json", exclude_none=True), ensure_ascii=False)
        try:
            resp = self.session.post(
                self.url, data=body.encode(), headers=self.headers(payload),
                timeout=(min(10.0, self.timeout), self.timeout), allow_redirects=False, stream=True,
            )
        except requests.RequestException as exc:
            raise RetryableError(f"callback failed: {type(exc).__name__}", code="callback_unavailable") from exc
        try:
            # Read at most a small prefix: a misbehaving endpoint must not make us buffer megabytes.
            # The status has already decided the outcome, so a broken body changes nothing.
            with contextlib.suppress(OSError, urllib3.exceptions.HTTPError):
                resp.raw.read(MAX_RESPONSE_BYTES, decode_content=True)
        finally:
            resp.close()
        error = classify_status(resp.status_code)
        if error:
            raise error

