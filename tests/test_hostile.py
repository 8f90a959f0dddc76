"""Hostile input against a running daemon process (issue 5, item 8).

Dozens of malformed, unsigned, forged, unsafe or poisonous messages are interleaved with valid jobs on
one queue served by `python -m consumer run`. Every valid job must complete, every bad message must be
dead-lettered with its reason, no secret may reach a log line, and the process must stay up throughout.

SQS's 256 KiB cap: moto (like SQS since 2025) accepts bodies up to 1 MiB, so the over-256 KiB bodies are
sent as they are and the daemon's own `body_too_large` cap is what rejects them.
"""

from __future__ import annotations

import io
import json
import re
import urllib.request
import wave
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from consumer.signing import sign
from tests.conftest import OPENAI_KEY, SECRET, TOKEN, DaemonProcess, send_job, upload
from tests.stack import wait_for
from tests.stack.aws import AwsStack
from tests.stack.wordpress import WordPressStub

AUDIO = Path(__file__).resolve().parent / "fixtures" / "audio"
MAX_AUDIO_BYTES = 200_000
REJECTIONS = ("invalid_message", "body_too_large", "forbidden_input", "bad_signature")
DAEMON_ENV = {"S3_KEY_PREFIX": "audio/", "MAX_AUDIO_BYTES": str(MAX_AUDIO_BYTES), "CONCURRENCY": "4",
              "S3_ALLOWED_BUCKETS": "archive-bucket-that-does-not-exist"}
LEGACY = "<message id>"  # a legacy body's job id is the SQS MessageId, known only once sent


@dataclass
class Case:
    """One message: what to send and what the daemon must make of it."""

    name: str
    body: str | None = None  # None: built from job_id/key/extra by send_job
    job_id: str | None = None
    key: str | None = None
    extra: dict[str, Any] | None = None
    code: str | None = None  # None: a valid job that must complete
    callback: str | None = None  # job id of the expected `failed` callback; None: no callback at all
    signature: str | None = None  # the attribute as sent; None: a correct signature
    secret: str | None = SECRET
    binary_signature: bool = False


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def silent_wav(seconds: float) -> bytes:
    """A valid 16 kHz mono PCM WAV of the given length (to exceed MAX_AUDIO_BYTES with real audio)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\x00\x00" * int(16000 * seconds))
    return buf.getvalue()


def signed_then_tampered() -> tuple[str, str]:
    good = json.dumps({"job_id": "tamper-1", "s3_key": "audio/ok-0.wav"})
    return good.replace("audio/ok-0.wav", "audio/../secrets"), sign(good, [SECRET])


def valid(i: int) -> Case:
    return Case(f"valid-{i}", job_id=f"ok-{i}", key=f"audio/ok-{i}.wav", extra={"metadata": {"post_id": i}})


def bad(name: str, code: str, **kw: Any) -> Case:
    """A bad message; its readable job_id (when it has one) is the one the failed callback must carry."""
    if "callback" not in kw and code != "bad_signature":
        kw["callback"] = kw.get("job_id")
    return Case(name, code=code, **kw)


def hostile_cases() -> list[Case]:
    tampered_body, tampered_sig = signed_then_tampered()
    ok = "audio/ok-0.wav"
    bad_cases = [
        # Not a JSON object at all: nothing readable, so no callback.
        bad("broken-json", "invalid_message", body='{"job_id": "broken-1", "s3_key": '),
        bad("json-array", "invalid_message", body='["job_id", "s3_key"]'),
        bad("json-string", "invalid_message", body='"audio/ok-0.wav"'),
        bad("json-number", "invalid_message", body="1e999"),
        bad("json-null", "invalid_message", body="null"),
        bad("nested-10000-arrays", "invalid_message", body="[" * 10000 + "]" * 10000),
        bad("nested-10000-metadata", "invalid_message",
            body='{"job_id": "deep-1", "s3_key": "audio/ok-0.wav", "metadata": ' + nested(10000) + "}"),
        # Wrong shapes with a readable job_id: a failed callback tells WordPress.
        bad("s3_key-number", "invalid_message", job_id="type-key", key=12345),  # type: ignore[arg-type]
        bad("s3_key-missing", "invalid_message", body='{"job_id": "type-nokey"}', job_id="type-nokey"),
        bad("metadata-list", "invalid_message", job_id="type-meta", key=ok, extra={"metadata": [1, 2]}),
        bad("metadata-over-16KiB", "invalid_message", job_id="big-meta", key=ok,
            extra={"metadata": {"blob": "x" * (17 * 1024)}}),
        bad("language-invalid", "invalid_message", job_id="lang-1", key=ok, extra={"language": "english"}),
        bad("prompt-over-4000", "invalid_message", job_id="prompt-1", key=ok, extra={"prompt": "p" * 4001}),
        bad("s3_key-over-1024", "invalid_message", job_id="long-key", key="audio/" + "k" * 1100),
        # A job_id that is not one: unreadable, so no callback.
        bad("job_id-object", "invalid_message", body=json.dumps({"job_id": {"$ne": ""}, "s3_key": ok})),
        bad("job_id-pattern", "invalid_message", body=json.dumps({"job_id": "ok-0/../x y", "s3_key": ok})),
        bad("job_id-newline", "invalid_message",
            body=json.dumps({"job_id": "ok-1\n{\"event\":\"job_completed\"}", "s3_key": ok})),
        bad("job_id-129-chars", "invalid_message", body=json.dumps({"job_id": "j" * 129, "s3_key": ok})),
        bad("job_id-true", "invalid_message", body=json.dumps({"job_id": True, "s3_key": ok})),
        bad("job_id-zero", "invalid_message", body=json.dumps({"job_id": 0, "s3_key": ok})),
        bad("job_id-float", "invalid_message", body='{"job_id": 1.0, "s3_key": "audio/ok-0.wav"}'),
        # What PHP sends: an integer job_id is readable (its decimal string), and metadata rides along.
        bad("job_id-integer-language-unknown", "invalid_message", callback="4242",
            body=json.dumps({"job_id": 4242, "s3_key": ok, "language": "deu", "metadata": {"post_id": 4242}})),
        bad("locale-with-foreign-bucket", "forbidden_input", job_id="loc-1", key=ok,
            extra={"language": "de_DE", "s3_bucket": "evil-bucket", "metadata": {"post_id": 7}}),
        # Size: the cap is on bytes, before signature or parsing.
        bad("body-over-256KiB", "body_too_large",
            body=json.dumps({"job_id": "huge-1", "s3_key": ok, "pad": "x" * (300 * 1024)})),
        bad("body-over-256KiB-utf8", "body_too_large",
            body=json.dumps({"job_id": "huge-2", "s3_key": ok, "pad": "é" * (140 * 1024)}, ensure_ascii=False)),
        # Signatures: never a callback, even with a perfectly readable job_id.
        bad("signature-missing", "bad_signature", job_id="sig-none", key=ok, secret=None),
        bad("signature-other-secret", "bad_signature", job_id="sig-other", key=ok, secret="not-the-secret"),
        bad("signature-garbage", "bad_signature", job_id="sig-garbage", key=ok, signature="garbage"),
        bad("signature-no-t", "bad_signature", job_id="sig-no-t", key=ok, signature="v1=" + "0" * 64),
        bad("signature-bad-t", "bad_signature", job_id="sig-bad-t", key=ok, signature="t=-1,v1=" + "0" * 64),
        bad("signature-too-long", "bad_signature", job_id="sig-long", key=ok,
            signature="t=1," + ",".join(["v1=" + "0" * 64] * 40)),
        bad("signature-binary", "bad_signature", job_id="sig-binary", key=ok, binary_signature=True),
        bad("body-tampered-after-signing", "bad_signature", body=tampered_body, signature=tampered_sig),
        # Unsafe keys and buckets.
        bad("path-traversal", "forbidden_input", job_id="trav-1", key="audio/../secrets"),
        bad("dot-segment", "forbidden_input", job_id="trav-2", key="audio/./ok-0.wav"),
        bad("leading-slash", "forbidden_input", job_id="slash-1", key="/audio/ok-0.wav"),
        bad("outside-prefix", "forbidden_input", job_id="prefix-1", key="private/ok-0.wav"),
        bad("foreign-bucket", "forbidden_input", job_id="bucket-1", key=ok, extra={"s3_bucket": "evil-bucket"}),
        bad("control-nul", "forbidden_input", job_id="ctl-nul", key="audio/ok-0\x00.wav"),
        bad("control-newline", "forbidden_input", job_id="ctl-nl", key="audio/ok-0.wav\nx"),
        bad("control-del", "forbidden_input", job_id="ctl-del", key="audio/ok\x7f-0.wav"),
        bad("unicode-rtl-override", "forbidden_input", job_id="uni-rtl",
            body=json.dumps({"job_id": "uni-rtl", "s3_key": "audio/ok-0\u202evaw.exe"}, ensure_ascii=False)),
        bad("unicode-zero-width", "forbidden_input", job_id="uni-zw", key="audio/ok\u200b-0.wav"),
        bad("unicode-not-nfc", "forbidden_input", job_id="uni-nfd", key="audio/cafe\u0301.wav"),
        bad("legacy-body-traversal", "forbidden_input", body=json.dumps({"s3_key": "audio/../../etc/passwd"}),
            callback=LEGACY),
        # Safe keys whose objects are missing, not audio, empty or too big.
        bad("key-missing", "audio_not_found", job_id="obj-missing", key="audio/does-not-exist.wav"),
        bad("allowed-bucket-missing", "audio_not_found", job_id="obj-nobucket", key=ok,
            extra={"s3_bucket": "archive-bucket-that-does-not-exist"}),
        bad("object-text", "unsupported_audio", job_id="obj-text", key="audio/notes.wav"),
        bad("object-png", "unsupported_audio", job_id="obj-png", key="audio/picture.webm"),
        bad("object-garbled", "unsupported_audio", job_id="obj-garbled", key="audio/garbled.webm"),
        bad("object-zero-bytes", "unsupported_audio", job_id="obj-empty", key="audio/empty.webm"),
        bad("object-too-large", "audio_too_large", job_id="obj-big", key="audio/long.wav"),
    ]
    valid_jobs = [valid(i) for i in range(5)]
    # Interleave: a valid job, then about ten bad ones, and so on.
    out: list[Case] = []
    step = -(-len(bad_cases) // len(valid_jobs))
    for i, v in enumerate(valid_jobs):
        out.append(v)
        out.extend(bad_cases[i * step:(i + 1) * step])
    return out


def upload_objects(aws: AwsStack) -> None:
    speech = (AUDIO / "speech.wav").read_bytes()
    for i in range(5):
        upload(aws, f"audio/ok-{i}.wav", data=speech)
    upload(aws, "audio/notes.wav", data=b"These are meeting notes, not a recording.\n" * 50)
    upload(aws, "audio/picture.webm", data=b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(4000))
    upload(aws, "audio/garbled.webm", AUDIO / "garbled.webm")
    upload(aws, "audio/empty.webm", AUDIO / "empty.webm")
    big = silent_wav(10)
    assert len(big) > MAX_AUDIO_BYTES
    upload(aws, "audio/long.wav", data=big)


def send(aws: AwsStack, case: Case) -> str:
    if case.binary_signature:
        body = json.dumps({"job_id": case.job_id, "s3_key": case.key})
        attrs = {"signature": {"DataType": "Binary", "BinaryValue": sign(body, [SECRET]).encode()}}
        return str(aws.sqs.send_message(QueueUrl=aws.queue_url, MessageBody=body,
                                        MessageAttributes=attrs)["MessageId"])
    return send_job(aws, case.job_id, case.key, body=case.body, extra=case.extra, secret=case.secret,
                    signature=case.signature)


def http_get(port: int, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return resp.status, resp.read().decode()


def rejected_counts(metrics_text: str) -> dict[str, float]:
    pattern = re.compile(r'^sidecar_rejected_total\{reason="([a-z_]+)"\} ([0-9.e+]+)$', re.M)
    return {reason: float(value) for reason, value in pattern.findall(metrics_text)}


def alive(daemon: DaemonProcess) -> None:
    code = daemon.proc.poll()
    assert code is None, f"daemon exited ({code}):\n{daemon.log_path.read_text()[-3000:]}"


def take_dead_letters(aws: AwsStack) -> dict[str, dict[str, str]]:
    """Every DLQ message's attributes by source message id; they stay hidden (AwsStack.dlq_messages reads
    with visibility 0, which sees only the first ten again and again)."""
    out: dict[str, dict[str, str]] = {}
    while batch := aws.sqs.receive_message(QueueUrl=aws.dlq_url, MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                           VisibilityTimeout=300, MessageAttributeNames=["All"]).get("Messages"):
        for m in batch:
            attrs = {k: v.get("StringValue", "") for k, v in m.get("MessageAttributes", {}).items()}
            out[attrs.get("source_message_id", m["MessageId"])] = attrs
    return out


def check_no_secrets(daemon: DaemonProcess, dead: dict[str, dict[str, str]], wordpress: WordPressStub) -> None:
    text = daemon.log_path.read_text(errors="replace")
    for name, secret in (("SIDE_CAR_SECRET", SECRET), ("WP_SERVER_TOKEN", TOKEN), ("OPENAI_API_KEY", OPENAI_KEY)):
        leaks = [line for line in text.splitlines() if secret in line]
        assert not leaks, f"{name} leaked into {len(leaks)} log line(s), e.g. {leaks[0][:300]}"
        for attrs in dead.values():
            assert secret not in attrs.get("error_message", ""), f"{name} in a dead letter's error_message"
    for callback in wordpress.received:
        assert OPENAI_KEY.encode() not in callback.raw and SECRET.encode() not in callback.raw


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_hostile_messages_interleaved_with_valid_jobs(spawn_daemon, aws, openai_stub, wordpress):
    upload_objects(aws)
    daemon = spawn_daemon(DAEMON_ENV)
    daemon.wait_ready()

    cases = hostile_cases()
    sent = {send(aws, case): case for case in cases}
    bad_cases = {mid: c for mid, c in sent.items() if c.code}
    valid_jobs = [c.job_id for c in sent.values() if not c.code]
    assert len(bad_cases) >= 20 and len(valid_jobs) == 5

    def settled() -> bool:
        alive(daemon)
        assert http_get(daemon.metrics_port, "/health")[0] == 200
        done = all(wordpress.terminal(j) for j in valid_jobs) and aws.counts() == (0, 0)
        return done and aws.counts(aws.dlq_url)[0] >= len(bad_cases)

    wait_for(settled, timeout=75, interval=0.3, what="valid jobs completed, bad ones dead-lettered, queue empty")

    # Alive throughout and at the end.
    alive(daemon)
    status, health = http_get(daemon.metrics_port, "/health")
    assert status == 200 and json.loads(health)["status"] == "ok"

    # Every valid job completed exactly once.
    for job_id in valid_jobs:
        assert [b["status"] for b in wordpress.terminal(job_id)] == ["completed"], job_id
    assert openai_stub.count() == len(valid_jobs)  # nothing bad reached the transcription API

    # Every bad message dead-lettered with its reason.
    dead = take_dead_letters(aws)
    problems = []
    for mid, case in bad_cases.items():
        attrs = dead.get(mid)
        if attrs is None:
            problems.append(f"{case.name}: not in the DLQ")
        elif attrs.get("error_code") != case.code or not attrs.get("error_message"):
            problems.append(f"{case.name}: error_code={attrs.get('error_code')!r} "
                            f"error_message={attrs.get('error_message')!r}, want {case.code}")
    assert not problems, "\n".join(problems)
    assert len(dead) == len(bad_cases)

    # A failed callback exactly when the job_id was readable and the signature good; none otherwise.
    expected_callbacks = 0
    for mid, case in bad_cases.items():
        job_id = mid if case.callback == LEGACY else case.callback
        if job_id is None:
            if case.job_id:
                assert wordpress.terminal(case.job_id) == [], f"{case.name}: unexpected callback"
            continue
        expected_callbacks += 1
        bodies = wordpress.terminal(job_id)
        assert [(b["status"], b["error"]["code"]) for b in bodies] == [("failed", case.code)], case.name
        assert bodies[0]["error"]["retryable"] is False and bodies[0]["error"]["message"]
    # Metadata comes back on a failed callback too: WordPress finds its post by it.
    assert [b["metadata"] for b in wordpress.terminal("4242")] == [{"post_id": 4242}]
    assert [b["metadata"] for b in wordpress.terminal("loc-1")] == [{"post_id": 7}]
    for name in ("tamper-1", "huge-1", "huge-2", "broken-1", "deep-1", "ok-0/../x y", "True", "1", "0"):
        assert wordpress.terminal(name) == [], f"{name}: a callback for a message that was not authentic/readable"
    assert len(wordpress.received) == len(valid_jobs) + expected_callbacks

    # The rejections are counted by reason.
    want = Counter(c.code for c in bad_cases.values() if c.code in REJECTIONS)
    _, metrics = http_get(daemon.metrics_port, "/metrics")
    assert rejected_counts(metrics) == {reason: float(n) for reason, n in want.items()}

    # No crash, no secret anywhere in the logs, one dead-letter event per bad message, and every line
    # still one JSON record (the job_id with a newline did not forge a line).
    lines = [line for line in daemon.log_path.read_text().splitlines() if line.strip()]
    assert len(daemon.logs()) == len(lines)
    assert not daemon.events("job_crashed") and not daemon.events("settle_failed")
    assert len(daemon.events("job_failed")) + len(daemon.events("job_dead_lettered")) == len(bad_cases)
    check_no_secrets(daemon, dead, wordpress)


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_input_the_callback_cannot_carry_is_rejected_with_a_reason(spawn_daemon, aws, openai_stub, wordpress):
    """Valid JSON the parser accepts but a callback cannot serialise: lone UTF-16 surrogate escapes
    (UTF-8 cannot encode them) and metadata nested deeper than pydantic's serializer allows (255)."""
    upload_objects(aws)
    daemon = spawn_daemon({**DAEMON_ENV, "VISIBILITY_TIMEOUT": "5"})
    daemon.wait_ready()
    ok = "audio/ok-0.wav"
    cases = [
        bad("surrogate-in-s3_key", "invalid_message", job_id="sur-key", key="audio/ok-0\ud800.wav"),
        bad("surrogate-in-metadata", "invalid_message", job_id="sur-meta", key=ok, extra={"metadata": {"n": "\udc00"}}),
        bad("metadata-nested-300", "invalid_message", job_id="deep-meta",
            body='{"job_id": "deep-meta", "s3_key": "audio/ok-0.wav", "metadata": ' + nested(300) + "}"),
    ]
    sent = {send(aws, case): case for case in cases}
    crash_events = ("job_crashed", "settle_failed")

    def crashed(mid: str) -> list[str]:
        return [f"{r['event']}: {r.get('exc_info', r.get('error', ''))[-200:]}"
                for name in crash_events for r in daemon.events(name) if r.get("message_id") == mid]

    def settled() -> bool:
        alive(daemon)
        return all(wordpress.terminal(c.job_id or "") or crashed(mid) for mid, c in sent.items()) and (
            any(crashed(mid) for mid in sent) or aws.counts(aws.dlq_url)[0] >= len(sent))

    wait_for(settled, timeout=60, interval=0.3, what="each case failed or crashed")
    dead = take_dead_letters(aws)
    problems = []
    for mid, case in sent.items():
        got = [(b["status"], b.get("error", {}).get("code")) for b in wordpress.terminal(case.job_id or "")]
        attrs = dead.get(mid, {})
        if crashed(mid):
            problems.append(f"{case.name}: the worker crashed settling it: {crashed(mid)[0]}")
        if attrs.get("error_code") not in ("invalid_message", "forbidden_input") or not attrs.get("error_message"):
            problems.append(f"{case.name}: dead letter {attrs or 'missing'}, want invalid_message with a message")
        if len(got) != 1 or got[0][0] != "failed" or got[0][1] != attrs.get("error_code"):
            problems.append(f"{case.name}: callbacks {got}, want one failed callback with the dead letter's code")
    assert not problems, "\n".join(problems)
    assert openai_stub.count() == 0  # rejected before any transcription was paid for
    check_no_secrets(daemon, dead, wordpress)
