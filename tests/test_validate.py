"""The validate stage: contract v1, the legacy body, input rules, and properties of the parser."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.errors import InvalidMessageError
from consumer.settings import load_settings
from consumer.signing import sign
from consumer.sqs import Message
from consumer.validate import parse_job

SECRET = "validate-secret"
SETTINGS = load_settings(env_file=None, s3_bucket="main-bucket", s3_allowed_buckets="other-bucket",
                         side_car_secret=SECRET, s3_key_prefix="audio/")


def msg(body: str | dict, *, signed: bool = True, message_id: str = "mid-1") -> Message:
    raw = body if isinstance(body, str) else json.dumps(body)
    attrs = {"signature": sign(raw, [SECRET])} if signed else {}
    return Message(message_id=message_id, receipt_handle="rh", body=raw, attributes=attrs)


def reject(message: Message) -> InvalidMessageError:
    with pytest.raises(InvalidMessageError) as err:
        parse_job(message, SETTINGS)
    return err.value


def test_full_v1_body():
    job = parse_job(msg({"job_id": "wp-1:2.3_4-5", "s3_key": "audio/x.webm", "s3_bucket": "other-bucket",
                         "language": "de", "prompt": "ACME", "metadata": {"post_id": 9}, "future": 1}), SETTINGS)
    assert (job.job_id, job.s3_bucket, job.language, job.metadata) == ("wp-1:2.3_4-5", "other-bucket", "de",
                                                                       {"post_id": 9})


def test_legacy_body_takes_the_message_id():
    job = parse_job(msg({"s3_key": "audio/old.wav"}, message_id="a1b2-c3"), SETTINGS)
    assert job.job_id == "a1b2-c3" and job.s3_key == "audio/old.wav"


@pytest.mark.parametrize(("body", "code", "job_id"), [
    ("not json", "invalid_message", None),
    ("[1,2]", "invalid_message", None),
    ("[" * 150000 + "]" * 150000, "body_too_large", None),
    ("[" * 50000 + "]" * 50000, "invalid_message", None),
    ({"job_id": "j", "s3_key": 5}, "invalid_message", "j"),
    ({"job_id": "bad id!", "s3_key": "audio/a"}, "invalid_message", None),
    ({"job_id": "j", "s3_key": "audio/a", "language": "english"}, "invalid_message", "j"),
    ({"job_id": "j", "s3_key": "audio/a", "metadata": {"x": "y" * 17000}}, "invalid_message", "j"),
    ({"job_id": "j", "s3_key": "audio/a", "s3_bucket": "evil-bucket"}, "forbidden_input", "j"),
    ({"job_id": "j", "s3_key": "audio/../etc/passwd"}, "forbidden_input", "j"),
    ({"job_id": "j", "s3_key": "/audio/a"}, "forbidden_input", "j"),
    ({"job_id": "j", "s3_key": "audio/a\x00b"}, "forbidden_input", "j"),
    ({"job_id": "j", "s3_key": "audio/a\u202eb"}, "forbidden_input", "j"),
    ({"job_id": "j", "s3_key": "other/a"}, "forbidden_input", "j"),
    ({"job_id": "j", "s3_key": "audio/" + "a" * 1100}, "invalid_message", "j"),
    ({"job_id": "j", "s3_key": "audio/e\u0301"}, "forbidden_input", "j"),
    ('{"job_id": "j", "s3_key": "audio/a", "metadata": {"x": NaN}}', "invalid_message", None),
    ('{"job_id": "j", "s3_key": "audio/a\\ud800"}', "invalid_message", "j"),
    ('{"job_id": "j", "s3_key": "audio/a", "metadata": {"a": ' + "[" * 40 + "]" * 40 + "}}", "invalid_message", "j"),
])
def test_rejections(body, code, job_id):
    err = reject(msg(body))
    assert err.code == code
    assert err.job_id == job_id


def test_bad_or_missing_signature_carries_no_job_id():
    good = json.dumps({"job_id": "j", "s3_key": "audio/a"})
    unsigned = reject(msg(good, signed=False))
    assert unsigned.code == "bad_signature" and unsigned.job_id is None
    forged = Message("m", "rh", good, attributes={"signature": sign(good, ["not-the-secret"])})
    assert reject(forged).code == "bad_signature"


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.text(max_size=400),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
                 lambda children: st.lists(children, max_size=4)
                 | st.dictionaries(st.sampled_from(["job_id", "s3_key", "s3_bucket", "language", "prompt",
                                                    "metadata", "x"]), children, max_size=6),
                 max_leaves=20).map(json.dumps),
))
def test_parser_raises_only_invalid_message_error(body):
    with contextlib.suppress(InvalidMessageError):
        parse_job(msg(body), SETTINGS)


@settings(max_examples=200, deadline=None)
@given(job_id=st.from_regex(r"[A-Za-z0-9._:-]{1,128}", fullmatch=True),
       key=st.from_regex(r"[a-z0-9][a-z0-9_-]{0,40}\.(webm|wav|m4a)", fullmatch=True),
       meta=st.dictionaries(st.text(max_size=10), st.integers(), max_size=5))
def test_signed_valid_bodies_round_trip(job_id, key, meta):
    job = parse_job(msg({"job_id": job_id, "s3_key": f"audio/{key}", "metadata": meta}), SETTINGS)
    assert (job.job_id, job.s3_key, job.metadata) == (job_id, f"audio/{key}", meta)
