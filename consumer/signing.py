"""Job message signatures: `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`.

Several `v1=` entries may appear and several secrets may be configured, so secrets can rotate: the
first configured secret signs, any verifies. Comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Sequence

from consumer.errors import PermanentError

MAX_HEADER_CHARS = 2048


def signature_digest(secret: str, timestamp: int, body: str) -> str:
    """Hex HMAC-SHA256 of "<t>.<body>" under one secret."""
    return hmac.new(secret.encode(), f"{timestamp}.{body}".encode(), hashlib.sha256).hexdigest()


def sign(body: str, secrets: Sequence[str], *, timestamp: int | None = None) -> str:
    """The `signature` attribute for body, signed by the first secret."""
    if not secrets:
        raise ValueError("no signing secret configured (SIDE_CAR_SECRET)")
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={signature_digest(secrets[0], t, body)}"


def _parse(header: str) -> tuple[int, list[str]]:
    if len(header) > MAX_HEADER_CHARS:
        raise PermanentError("signature attribute is too long", code="bad_signature")
    timestamp: int | None = None
    digests: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            continue
        if key == "t" and value.isdigit() and len(value) <= 12:
            timestamp = int(value)
        elif key == "v1":
            digests.append(value.lower())
    if timestamp is None or not digests:
        raise PermanentError("signature attribute is malformed (want t=...,v1=...)", code="bad_signature")
    return timestamp, digests


def verify(
    body: str,
    header: str | None,
    secrets: Sequence[str],
    *,
    max_age: float | None = None,
    now: float | None = None,
) -> None:
    """Raise PermanentError(bad_signature) unless one v1 digest matches one secret."""
    if not header:
        raise PermanentError("message is not signed (no 'signature' attribute)", code="bad_signature")
    timestamp, digests = _parse(header)
    if max_age is not None:
        age = (time.time() if now is None else now) - timestamp
        if age > max_age:
            raise PermanentError(f"signature is {int(age)} s old (limit {int(max_age)})", code="bad_signature")
    # Compare every pair without an early exit so the time taken does not depend on which one matched.
    matched = False
    for secret in secrets:
        expected = signature_digest(secret, timestamp, body)
        for digest in digests:
            matched |= hmac.compare_digest(expected, digest)
    if not matched:
        raise PermanentError("signature does not match any configured secret", code="bad_signature")
