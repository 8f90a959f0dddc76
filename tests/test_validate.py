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


# ---- what PHP sends (docs/contract.md, "What PHP sends")

@pytest.mark.parametrize(("job_id", "want"), [
    (1234, "1234"), (1, "1"), (2**63 - 1, "9223372036854775807"), ("0042", "0042"),
])
def test_integer_job_ids_are_taken_as_their_decimal_string(job_id, want):
    assert parse_job(msg({"job_id": job_id, "s3_key": "audio/a.wav"}), SETTINGS).job_id == want


@pytest.mark.parametrize("body", [
    '{"job_id": true, "s3_key": "audio/a.wav"}',  # a bool is an int in Python: must not become "True" or "1"
    '{"job_id": false, "s3_key": "audio/a.wav"}',
    '{"job_id": 0, "s3_key": "audio/a.wav"}',  # PHP's "no id": every such job would share one key
    '{"job_id": -7, "s3_key": "audio/a.wav"}',
    '{"job_id": 9223372036854775808, "s3_key": "audio/a.wav"}',  # past PHP_INT_MAX: no PHP int wrote it
    '{"job_id": 1234.0, "s3_key": "audio/a.wav"}',
    '{"job_id": 1e3, "s3_key": "audio/a.wav"}',
])
def test_job_ids_that_are_not_positive_integers_or_strings_are_unreadable(body):
    err = reject(msg(body))
    assert err.code == "invalid_message" and err.job_id is None and err.message.startswith("job_id:")


@pytest.mark.parametrize(("language", "want"), [
    ("de", "de"), ("de_DE", "de"), ("pt_BR", "pt"), ("en_US", "en"), ("de_DE_formal", "de"), ("pt_PT_ao90", "pt"),
    ("de-DE", "de"),  # get_bloginfo('language')
])
def test_wordpress_locales_become_iso_639_1(language, want):
    job = parse_job(msg({"job_id": "j", "s3_key": "audio/a.wav", "language": language}), SETTINGS)
    assert job.language == want


@pytest.mark.parametrize("language", ["english", "DE", "de_de", "deu", "ast", "d", "", "de_DE ", "de_DE\n", 7])
def test_other_languages_are_invalid_and_named(language):
    err = reject(msg({"job_id": "j", "s3_key": "audio/a.wav", "language": language, "metadata": {"post_id": 5}}))
    assert err.code == "invalid_message" and err.message.startswith("language: ")
    assert "Value error" not in err.message
    assert (err.job_id, err.metadata) == ("j", {"post_id": 5})  # the failed callback can find the post


def test_php_empty_array_metadata_is_empty():
    assert parse_job(msg('{"job_id":"j","s3_key":"audio\\/a.wav","metadata":[]}'), SETTINGS).metadata == {}
    err = reject(msg({"job_id": "j", "s3_key": "audio/a.wav", "metadata": [1]}))
    assert err.message.startswith("metadata:") and err.metadata is None


def test_metadata_limit_counts_utf8_bytes_not_escapes():
    text = "ü" * 4500  # 9000 UTF-8 bytes; as wp_json_encode writes it, 27000 characters of \u00fc
    body = json.dumps({"job_id": "j", "s3_key": "audio/a.wav", "metadata": {"note": text}})
    assert len(body) > 16 * 1024
    assert parse_job(msg(body), SETTINGS).metadata == {"note": text}
    over = json.dumps({"job_id": "j", "s3_key": "audio/a.wav", "metadata": {"note": "ü" * 8200}})
    err = reject(msg(over))
    assert "metadata is larger than 16384 bytes" in err.message and err.metadata is None


def test_metadata_rides_on_every_rejection_after_parsing():
    meta = {"post_id": 9, "title": "Grüße"}
    for extra in ({"s3_bucket": "evil-bucket"}, {"prompt": "p" * 4001}):
        err = reject(msg({"job_id": 77, "s3_key": "audio/a.wav", "metadata": meta, **extra}))
        assert (err.job_id, err.metadata) == ("77", meta)
    assert reject(msg({"job_id": "j", "s3_key": "../a", "metadata": []})).metadata == {}


SCHEMA_CASES = [
    ({"job_id": 1234, "s3_key": "audio/a"}, True),
    ({"job_id": "wp-1", "s3_key": "audio/a", "language": "de_DE", "metadata": []}, True),
    ({"job_id": "wp-1", "s3_key": "audio/a", "language": "pt-BR", "metadata": {"a": 1}}, True),
    ({"job_id": True, "s3_key": "audio/a"}, False),
    ({"job_id": 0, "s3_key": "audio/a"}, False),
    ({"job_id": 1.5, "s3_key": "audio/a"}, False),
    ({"job_id": "a b", "s3_key": "audio/a"}, False),
    ({"job_id": "j", "s3_key": "audio/a", "language": "english"}, False),
    ({"job_id": "j", "s3_key": "audio/a", "metadata": [1]}, False),
    ({"job_id": "j", "s3_key": "audio/a", "metadata": "x"}, False),
]


@pytest.mark.parametrize(("body", "valid"), SCHEMA_CASES)
def test_the_published_schema_agrees_with_the_parser(body, valid):
    import jsonschema

    from consumer.models import json_schema

    schema_ok = jsonschema.Draft202012Validator(json_schema("job")).is_valid(body)
    try:
        parse_job(msg(body), SETTINGS)
        parser_ok = True
    except InvalidMessageError:
        parser_ok = False
    assert (schema_ok, parser_ok) == (valid, valid)
