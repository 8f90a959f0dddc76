"""Signatures: the published test vectors, rotation, tampering, and properties (hypothesis)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.errors import PermanentError
from consumer.signing import sign, signature_digest, verify

ROOT = Path(__file__).resolve().parent.parent

# The vectors in docs/contract.md: any implementation (WordPress' PHP included) must reproduce them.
VECTOR_SECRET, VECTOR_T = "s3cr3t", 1700000000
VECTOR_BODY = '{"job_id":"job-1","s3_key":"audio/job-1.webm"}'
VECTOR_DIGEST = "7fb9dec6c30426d339a6ed8ccf9e2770870f644a40985c5067b47842fb66bb52"


def test_vector_matches_docs_and_an_independent_hmac():
    assert signature_digest(VECTOR_SECRET, VECTOR_T, VECTOR_BODY) == VECTOR_DIGEST
    docs = (ROOT / "docs" / "contract.md").read_text(encoding="utf-8")
    assert f"t={VECTOR_T},v1={VECTOR_DIGEST}" in docs, "docs/contract.md must carry the current test vector"
    if shutil.which("openssl"):  # a second implementation, as WordPress' hash_hmac would be
        out = subprocess.run(["openssl", "dgst", "-sha256", "-hmac", VECTOR_SECRET], check=True,
                             input=f"{VECTOR_T}.{VECTOR_BODY}".encode(), capture_output=True).stdout.decode()
        assert out.strip().endswith(VECTOR_DIGEST)


def test_round_trip_and_rotation():
    body = '{"job_id":"a","s3_key":"k"}'
    header = sign(body, ["new", "old"], timestamp=1000)
    verify(body, header, ["new"])
    verify(body, header, ["old", "new"])  # any configured secret verifies
    old = sign(body, ["old"], timestamp=1000)
    verify(body, old, ["new", "old"])
    both = f"t=1000,v1={signature_digest('old', 1000, body)},v1={signature_digest('new', 1000, body)}"
    verify(body, both, ["new"])


@pytest.mark.parametrize("header", [
    None, "", "garbage", "t=abc,v1=00", "v1=00", "t=1000", "t=1000,v1=" + "0" * 64, "t=" + "9" * 40 + ",v1=00",
    "x" * 5000,
])
def test_bad_headers_are_rejected(header):
    with pytest.raises(PermanentError) as err:
        verify("{}", header, ["secret"])
    assert err.value.code == "bad_signature"


def test_tampered_body_or_wrong_secret():
    header = sign('{"a":1}', ["k"], timestamp=5)
    with pytest.raises(PermanentError):
        verify('{"a":2}', header, ["k"])
    with pytest.raises(PermanentError):
        verify('{"a":1}', header, ["other"])


def test_max_age():
    header = sign("{}", ["k"], timestamp=1000)
    verify("{}", header, ["k"], max_age=60, now=1050)
    with pytest.raises(PermanentError, match="old"):
        verify("{}", header, ["k"], max_age=60, now=1100)


@given(body=st.text(max_size=300), secret=st.text(min_size=1, max_size=40), t=st.integers(0, 10**11))
def test_signed_bodies_round_trip(body, secret, t):
    verify(body, sign(body, [secret], timestamp=t), [secret])


@given(body=st.text(max_size=200), header=st.one_of(st.none(), st.text(max_size=300)))
def test_verifier_raises_only_bad_signature(body, header):
    try:
        verify(body, header, ["secret"])
    except PermanentError as exc:
        assert exc.code == "bad_signature"
