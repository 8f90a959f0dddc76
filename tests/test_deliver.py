"""The WordPress callback on the wire: headers, token placement, statuses, redirects."""

from __future__ import annotations

import pytest

from consumer.deliver import Deliverer, make_session
from consumer.errors import PermanentError, RetryableError
from consumer.models import CallbackPayload, Transcript

TOKEN = "tok-123456"


def payload(**over):
    base = {"server_token": TOKEN, "job_id": "j-1", "s3_key": "a.wav", "status": "completed",
            "transcript": Transcript(text="hi"), "attempt": 1}
    return CallbackPayload(**{**base, **over})


def deliverer(url, *, header=True):
    return Deliverer(make_session(retries=0), url, send_token_header=header, timeout=5)


def test_headers_and_body(wordpress):
    deliverer(wordpress.url).post(payload(metadata={"a": [1, 2]}))
    [cb] = wordpress.received
    assert cb.path.endswith("/upload-complete")
    assert cb.headers["x-server-token"] == TOKEN and "authorization" not in cb.headers
    assert cb.body["server_token"] == TOKEN and cb.body["metadata"] == {"a": [1, 2]}
    assert "error" not in cb.body  # absent fields are left out, not null


def test_token_header_can_be_turned_off(wordpress):
    deliverer(wordpress.url, header=False).post(payload())
    [cb] = wordpress.received
    assert "x-server-token" not in cb.headers and cb.body["server_token"] == TOKEN


@pytest.mark.parametrize(("status", "kind", "code"), [
    (500, RetryableError, "callback_unavailable"), (503, RetryableError, "callback_unavailable"),
    (429, RetryableError, "callback_unavailable"), (408, RetryableError, "callback_unavailable"),
    (400, PermanentError, "callback_rejected"), (422, PermanentError, "callback_rejected"),
    (302, PermanentError, "callback_rejected"),
    # The endpoint, not the job: a wrong token, route or a disabled plugin is the deployment's to fix.
    (401, RetryableError, "callback_misconfigured"), (403, RetryableError, "callback_misconfigured"),
    (404, RetryableError, "callback_misconfigured"),
])
def test_statuses(wordpress, status, kind, code):
    wordpress.statuses.append(status)
    with pytest.raises(kind) as err:
        deliverer(wordpress.url).post(payload())
    assert err.value.code == code
    assert len(wordpress.received) == 1  # a redirect is not followed


def test_quick_retries_ride_over_a_blip(wordpress):
    wordpress.statuses.extend([503, 502])
    Deliverer(make_session(retries=2), wordpress.url, send_token_header=True, timeout=5).post(payload())
    assert [c.status_returned for c in wordpress.received] == [503, 502, 200]


def test_connection_refused_is_retryable():
    with pytest.raises(RetryableError):
        deliverer("http://127.0.0.1:9/cb").post(payload())
