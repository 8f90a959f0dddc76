"""Adversarial sequences around fdc493e ("the claim runs beside the download"), against the promises of
docs/contract.md ("One job, one story") and consumer/jobrecord.py: duplicates arriving together, S3 errors on
one side of the claim/download pair, oversized and empty recordings meeting a record in each state, shutdown
with the claim in flight, MAX_JOB_AGE, invalid messages, kill -9 at the claim, the failure callback after a
download error, the stage metrics name, temp files and threads left behind.

Each runs the daemon in-process (or as a subprocess where a crash matters) against moto in server mode and
the OpenAI and WordPress stand-ins on the wire. S3 faults are botocore before-send hooks on the daemon's own
client. The four bugs these found (an OSError from an unneeded download escaping, a claim thread
outliving the daemon, a claim in flight at the hand-back left behind) are fixed; each docstring gives the
sequence as it was found."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse

from consumer.jobrecord import JobRecord
from consumer.models import ErrorInfo, Transcript
from consumer.records import RecordStore
from tests.conftest import RunningDaemon, send_job, upload
from tests.stack import wait_for
from tests.stack.aws import AwsStack
from tests.test_job_story import dead_codes, record, story

pytestmark = pytest.mark.timeout(90)

STORED = Transcript(text="stored transcript", duration_seconds=1.5)


# ---------------------------------------------------------------------------------------------- helpers


def store(aws: AwsStack) -> RecordStore:
    return RecordStore(aws.s3, aws.bucket, "transcripts/")


def seed(aws: AwsStack, job_id: str, key: str, state: str, *, age: float = 0.0) -> None:
    """Write the job's record as an earlier delivery would have left it in `state`."""
    now = time.time()
    rec = JobRecord(job_id=job_id, s3_key=key, first_seen=now - age)
    if state in ("completing", "completed"):
        rec = rec.completing(STORED, model="whisper-1", audio_etag='"old"')
    if state == "failing":
        rec = rec.failing(ErrorInfo(code="transcription_rejected", message="stored failure", retryable=False))
    if state == "completed":
        rec = rec.acknowledged(now)
    store(aws).create(rec)


def errors(rd: RunningDaemon) -> dict[tuple[str, str], float]:
    """sidecar_errors by (stage, code), the non-zero ones."""
    out = {}
    for metric in rd.daemon.metrics.errors.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.value:
                out[(sample.labels["stage"], sample.labels["code"])] = sample.value
    return out


def settled(aws: AwsStack) -> bool:
    return aws.counts() == (0, 0)


def leftovers(rd: RunningDaemon) -> list[str]:
    """Job directories under the daemon's private workdir (each job's must be gone once it settled)."""
    workdir: Path = rd.daemon.workdir
    return sorted(p.name for p in workdir.iterdir()) if workdir.exists() else []


def slow_down() -> AWSResponse:
    """S3's throttling answer (503 SlowDown), which botocore retries and then gives up on."""

    class Raw:
        def stream(self, **_: Any) -> Iterator[bytes]:
            yield (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                   b"<Message>Please reduce your request rate.</Message></Error>")

    return AWSResponse("", 503, {"Content-Type": "application/xml"}, Raw())


def site_hook(tmp_path: Path, code: str) -> dict[str, str]:
    """Environment for a daemon subprocess that runs `code` at start-up (a sitecustomize module)."""
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(code)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))}


def path_of(request: Any) -> str:
    return str(request.url).split("?")[0]


# ---------------------------------------------------------------------------------------------- duplicates


@pytest.mark.parametrize("daemons", [1, 2])
def test_copies_of_one_job_given_out_at_once_transcribe_and_call_back_once(run_daemon, aws, openai_stub,
                                                                           wordpress, tmp_path, daemons):
    """Two copies of job `dup` are taken together, by two workers of one daemon or by two daemons: both
    downloads are held until both are on the wire, so both claims go out beside them. One transcribes; the
    other's claim finds the job taken (a deferral, named `claim`, not a stopped download), and later deletes
    its copy as a duplicate."""
    upload(aws, "audio/dup.wav")
    together, first_two = threading.Barrier(2), iter(range(2))
    lock = threading.Lock()

    def both_downloads_in_flight(request: Any, **_: Any) -> None:
        if request.method == "GET" and path_of(request).endswith("/audio/dup.wav"):
            with lock:
                waits = next(first_two, None) is not None  # only the two first GETs meet; a retry goes on
            if waits:
                together.wait(timeout=10)

    send_job(aws, "dup", "audio/dup.wav")
    send_job(aws, "dup", "audio/dup.wav")
    if daemons == 1:
        running = [run_daemon(s3_hooks=[both_downloads_in_flight], concurrency=2, visibility_timeout=4)]
    else:
        running = [run_daemon(s3_hooks=[both_downloads_in_flight], concurrency=1, visibility_timeout=4),
                   # Its own TEMP_DIR: in one process both would share (and the second clear) the pid's workdir.
                   run_daemon(s3_hooks=[both_downloads_in_flight], concurrency=1, visibility_timeout=4,
                                 temp_dir=str(tmp_path / "b"))]
    wait_for(lambda: story(wordpress, "dup"), timeout=30, what="the callback")
    wait_for(lambda: settled(aws), timeout=40, what="both copies settled")
    assert together.broken is False  # both downloads were in flight together
    assert story(wordpress, "dup") == [("completed", 200)] and openai_stub.count() == 1
    assert aws.dlq_messages() == []
    seen = {key: value for rd in running for key, value in errors(rd).items()}
    assert set(seen) <= {("claim", "job_in_progress")}, seen  # never a `download_stopped` nor a download stage
    assert all(leftovers(rd) == [] for rd in running)


def test_a_copy_meeting_another_deliverys_claim_defers_as_the_claim_and_keeps_nothing(run_daemon, aws, openai_stub,
                                                                                     wordpress):
    """Another delivery holds job `held` (its claim runs another minute): this copy's claim is refused, its
    download (begun beside it) is stopped, and the deferral is named `claim` / job_in_progress, not a
    stopped download; nothing is transcribed, said, or left in the workdir."""
    upload(aws, "audio/held.wav")
    now = time.time()
    store(aws).create(JobRecord.new("held", "audio/held.wav", owner="elsewhere:1:m:1", until=now + 60, now=now))
    send_job(aws, "held", "audio/held.wav")
    rd = run_daemon()
    wait_for(lambda: errors(rd), timeout=30, what="the deferral")
    wait_for(lambda: aws.counts() == (0, 1) and rd.worker.in_flight == 0, timeout=10, what="the copy put back")
    assert errors(rd) == {("claim", "job_in_progress"): 1}
    assert openai_stub.count() == 0 and not wordpress.received and leftovers(rd) == []
    assert record(aws, "held").claim.owner == "elsewhere:1:m:1"


# ---------------------------------------------------------------------------------------------- S3 errors on one side


def test_an_s3_error_on_the_claim_while_the_download_succeeds_is_the_claims(run_daemon, aws, openai_stub,
                                                                           wordpress):
    """S3 throttles the job record (every request, for one receive) while the recording downloads fine: the
    attempt is retried as s3_unavailable at the `claim` stage, WordPress hears nothing, nothing is paid for;
    once S3 recovers the job completes once."""
    upload(aws, "audio/c1.wav")
    armed = threading.Event()
    armed.set()

    def record_throttled(request: Any, **_: Any) -> AWSResponse | None:
        return slow_down() if armed.is_set() and path_of(request).endswith("/c1.job.json") else None

    send_job(aws, "c1", "audio/c1.wav")
    rd = run_daemon(s3_hooks=[record_throttled])
    wait_for(lambda: errors(rd), timeout=30, what="the first attempt's error")
    assert errors(rd) == {("claim", "s3_unavailable"): 1} and openai_stub.count() == 0 and not wordpress.received
    assert leftovers(rd) == []
    armed.clear()
    wait_for(lambda: story(wordpress, "c1"), timeout=30, what="the callback")
    wait_for(lambda: settled(aws), timeout=30, what="settled")
    assert story(wordpress, "c1") == [("completed", 200)] and openai_stub.count() == 1
    assert errors(rd) == {("claim", "s3_unavailable"): 1} and leftovers(rd) == []


def test_an_s3_error_on_the_download_while_the_claim_succeeds_is_the_downloads_and_frees_the_claim(
        run_daemon, aws, openai_stub, wordpress):
    """The claim is written; S3 throttles the recording's GET: retried as s3_unavailable at the `download`
    stage, the claim given back (the next delivery need not wait for it), then the job completes once."""
    upload(aws, "audio/d1.wav")
    armed = threading.Event()
    armed.set()

    def audio_throttled(request: Any, **_: Any) -> AWSResponse | None:
        return slow_down() if armed.is_set() and path_of(request).endswith("/audio/d1.wav") else None

    send_job(aws, "d1", "audio/d1.wav")
    rd = run_daemon(s3_hooks=[audio_throttled])
    wait_for(lambda: errors(rd), timeout=30, what="the first attempt's error")
    assert errors(rd) == {("download", "s3_unavailable"): 1}
    wait_for(lambda: record(aws, "d1").claim is None, timeout=10, what="the claim given back")
    assert leftovers(rd) == [] and not wordpress.received and openai_stub.count() == 0
    armed.clear()
    wait_for(lambda: story(wordpress, "d1"), timeout=30, what="the callback")
    wait_for(lambda: settled(aws), timeout=30, what="settled")
    assert story(wordpress, "d1") == [("completed", 200)] and openai_stub.count() == 1


def test_an_s3_error_on_both_sides_is_counted_once_at_the_claim(run_daemon, aws, openai_stub, wordpress):
    """The record and the recording both throttled: one error, named after the claim (the record is what
    was not known), not two, and not a stopped download."""
    upload(aws, "audio/b1.wav")
    armed = threading.Event()
    armed.set()

    def both_throttled(request: Any, **_: Any) -> AWSResponse | None:
        hit = path_of(request).endswith(("/b1.job.json", "/audio/b1.wav"))
        return slow_down() if armed.is_set() and hit else None

    send_job(aws, "b1", "audio/b1.wav")
    rd = run_daemon(s3_hooks=[both_throttled])
    wait_for(lambda: errors(rd), timeout=30, what="the first attempt's error")
    armed.clear()
    wait_for(lambda: story(wordpress, "b1"), timeout=30, what="the callback")
    assert errors(rd) == {("claim", "s3_unavailable"): 1}
    assert story(wordpress, "b1") == [("completed", 200)] and openai_stub.count() == 1 and leftovers(rd) == []


# ---------------------------------------------------------------------------------------- a recording not needed


RECORDINGS = {"oversized": "audio_too_large", "empty": "unsupported_audio", "deleted": "audio_not_found"}
STATES = ("completing", "completed", "failing", "waiting")


def test_a_recording_that_cannot_be_used_counts_only_when_the_record_needs_it(run_daemon, aws, openai_stub,
                                                                             wordpress):
    """Each of twelve jobs has its record left in one state by an earlier delivery; meanwhile its recording
    was replaced by one over MAX_AUDIO_BYTES, by an empty one, or deleted. Only a WAITING job needs it: it
    fails with the download's code at the `download` stage. The others re-send what the record says
    (contract: "whatever became of the recording"), or delete a duplicate, and their download's error is
    counted nowhere. (One daemon for all twelve: the pairs do not share a job, a key or a record.)"""
    jobs = {f"{recording}-{state}": (recording, state) for recording in RECORDINGS for state in STATES}
    for job, (recording, state) in jobs.items():
        key = f"audio/{job}.wav"
        if recording == "oversized":
            upload(aws, key)  # the speech fixture, far over MAX_AUDIO_BYTES=1000
        elif recording == "empty":
            upload(aws, key, data=b"")
        seed(aws, job, key, state)
        send_job(aws, job, key)
    rd = run_daemon(max_audio_bytes=1000)
    wait_for(lambda: settled(aws) and rd.worker.in_flight == 0, timeout=40, what="all settled")
    letters = {json.loads(m["Body"])["job_id"]: m["MessageAttributes"]["error_code"]["StringValue"]
               for m in aws.dlq_messages()}
    for job, (recording, state) in jobs.items():
        heard = [(c.body["status"], (c.body.get("error") or {}).get("code"), (c.body.get("transcript") or {})
                  .get("text")) for c in wordpress.received if c.body["job_id"] == job]
        expected = {"completing": ([("completed", None, STORED.text)], None),
                    "completed": ([], None),
                    "failing": ([("failed", "transcription_rejected", None)], "transcription_rejected"),
                    "waiting": ([("failed", RECORDINGS[recording], None)], RECORDINGS[recording])}[state]
        assert (heard, letters.get(job)) == expected, job
    downloads = {("download", code): 1 for code in RECORDINGS.values()}  # the WAITING jobs' only
    assert errors(rd) == {("claim", "transcription_rejected"): 3, **downloads}
    assert openai_stub.count() == 0 and leftovers(rd) == []


def _download_then_disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """The temp filesystem fills up while the recording is written (ENOSPC from the write)."""
    from consumer import fetch

    real = fetch.download

    def full(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fetch, "download", full)


def test_a_full_disk_does_not_stop_a_completing_job_re_sending_completed(run_daemon, aws, openai_stub, wordpress,
                                                                          monkeypatch):
    """Job `fc` is COMPLETING (`completed` attempted, not acknowledged). Its next delivery downloads the
    recording beside the claim, as every delivery now does, and the temp disk is full. The record says the
    recording is not needed, yet the OSError escapes `_claim_and_download` (only ConsumerError is kept for
    the record to judge): `job_crashed`, retried as internal_error on every receive, and on the last one
    dead-lettered as callback_undelivered without `completed` being re-sent. Before fdc493e a COMPLETING
    job never touched the recording.
    Promise (jobrecord.py, contract invariant 1): `completed` is re-sent from the stored transcript,
    whatever became of the recording."""
    upload(aws, "audio/fc.wav")
    seed(aws, "fc", "audio/fc.wav", "completing")
    _download_then_disk_full(monkeypatch)
    send_job(aws, "fc", "audio/fc.wav")
    rd = run_daemon()
    wait_for(lambda: story(wordpress, "fc") or errors(rd), timeout=30, what="the callback or an error")
    assert story(wordpress, "fc") == [("completed", 200)], errors(rd)


def test_a_full_disk_does_not_turn_a_duplicate_into_a_dead_letter(moto_server, run_daemon, openai_stub, wordpress,
                                                                  monkeypatch):
    """Job `fd` is COMPLETED (acknowledged). A duplicate copy arrives while the temp disk is full: its
    download (not needed) fails with OSError, which escapes as internal_error at the `download` stage; with
    MaxReceiveCount 1 the copy goes to the DLQ as internal_error, an alert for a job that was done.
    Promise (contract: a duplicate of a completed job is deleted, nothing said)."""
    aws = AwsStack.create(moto_server, max_receives=1)
    upload(aws, "audio/fd.wav")
    seed(aws, "fd", "audio/fd.wav", "completed")
    _download_then_disk_full(monkeypatch)
    send_job(aws, "fd", "audio/fd.wav")
    rd = run_daemon(sqs_queue_url=aws.queue_url, s3_bucket=aws.bucket)
    wait_for(lambda: settled(aws), timeout=30, what="settled")
    assert aws.dlq_messages() == [] and not wordpress.received, errors(rd)


# ---------------------------------------------------------------------------------------------- MAX_JOB_AGE


@pytest.mark.parametrize(("state", "calls", "code"), [
    ("waiting", [("failed", 200)], "job_expired"),
    ("completing", [], "callback_undelivered"),
])
def test_an_expired_job_is_judged_by_its_record_not_its_download(run_daemon, aws, openai_stub, wordpress,
                                                                  state, calls, code):
    """A job older than MAX_JOB_AGE whose recording is gone: WAITING fails as job_expired (not
    audio_not_found), COMPLETING is dead-lettered callback_undelivered; both named at the `claim` stage."""
    seed(aws, "old", "audio/old.wav", state, age=100)
    send_job(aws, "old", "audio/old.wav")
    rd = run_daemon(max_job_age=10)
    wait_for(lambda: settled(aws) and dead_codes(aws), timeout=30, what="dead-lettered")
    assert dead_codes(aws) == [code] and story(wordpress, "old") == calls
    assert errors(rd) == {("claim", code): 1} and openai_stub.count() == 0 and leftovers(rd) == []


# ---------------------------------------------------------------------------------------------- invalid messages


def test_an_invalid_message_claims_nothing_and_leaves_nothing(run_daemon, aws, openai_stub, wordpress):
    """An unsigned message and a legacy `{"s3_key"}` one: the first is dead-lettered without a record or a
    download; the second (signed) completes under its MessageId. No job directory is left."""
    upload(aws, "audio/legacy.wav")
    send_job(aws, "bad", "audio/legacy.wav", secret=None)
    legacy = send_job(aws, None, None, body='{"s3_key": "audio/legacy.wav"}')
    rd = run_daemon()
    wait_for(lambda: settled(aws) and wordpress.received, timeout=30, what="both settled")
    assert store(aws).read("bad") is None
    assert [c.body["job_id"] for c in wordpress.received] == [legacy] and openai_stub.count() == 1
    assert dead_codes(aws) == ["bad_signature"] and leftovers(rd) == []


# ---------------------------------------------------------------------------------------------- the failure callback


def test_a_missing_recording_is_failed_once_from_the_download_stage(run_daemon, aws, openai_stub, wordpress):
    """No recording: report_failure, after the download's error, writes `failed` to the record and tells
    WordPress once; the claim is given back and the job directory removed."""
    send_job(aws, "gone", "audio/gone.wav")
    rd = run_daemon()
    wait_for(lambda: settled(aws) and dead_codes(aws), timeout=30, what="dead-lettered")
    assert story(wordpress, "gone") == [("failed", 200)] and dead_codes(aws) == ["audio_not_found"]
    assert errors(rd) == {("download", "audio_not_found"): 1}
    found = record(aws, "gone")
    assert found.outcome == "failed" and found.acknowledged_at and found.claim is None
    assert leftovers(rd) == []


# ---------------------------------------------------------------------------------------------- shutdown


def _hold_the_claim(job: str) -> tuple[Callable[..., None], threading.Event, threading.Event]:
    """A hook holding the job's first record write (the claim) until `release` is set; `held` says it is."""
    held, release = threading.Event(), threading.Event()

    def hook(request: Any, **_: Any) -> None:
        if request.method == "PUT" and path_of(request).endswith(f"/{job}.job.json") and not held.is_set():
            held.set()
            release.wait(30)

    return hook, held, release


def test_a_stop_while_the_claim_is_in_flight_finishes_the_job_within_the_grace(run_daemon, aws, openai_stub,
                                                                               wordpress):
    """SIGTERM (the stop event) while the claim is on the wire: the claim comes back within SHUTDOWN_GRACE
    and the job is finished, once, before the daemon stops."""
    upload(aws, "audio/s1.wav")
    hook, held, release = _hold_the_claim("s1")
    send_job(aws, "s1", "audio/s1.wav")
    rd = run_daemon(s3_hooks=[hook], shutdown_grace=20)
    wait_for(held.is_set, timeout=30, what="the claim on the wire")
    rd.daemon.worker.request_stop()
    release.set()
    assert rd.stop(timeout=40) == 0
    assert story(wordpress, "s1") == [("completed", 200)] and openai_stub.count() == 1 and settled(aws)
    assert not rd.daemon.workdir.exists()


def test_a_job_handed_back_with_its_claim_in_flight_is_taken_at_once_by_the_next_daemon(run_daemon, aws,
                                                                                        openai_stub, wordpress):
    """SHUTDOWN_GRACE runs out while the claim is on the wire: the message is handed back. The claim then
    lands; the stopping delivery must not start anything and must give the claim back, so the next daemon
    takes the job without waiting for the claim to expire (VISIBILITY_TIMEOUT=30 here)."""
    upload(aws, "audio/s2.wav")
    hook, held, release = _hold_the_claim("s2")
    send_job(aws, "s2", "audio/s2.wav")
    first = run_daemon(s3_hooks=[hook], shutdown_grace=0)
    wait_for(held.is_set, timeout=30, what="the claim on the wire")
    assert first.stop(timeout=20) == 0
    release.set()  # the claim lands after the hand-back
    wait_for(lambda: store(aws).read("s2") and record(aws, "s2").claim is None, timeout=15,
             what="the late claim given back")
    run_daemon()
    wait_for(lambda: story(wordpress, "s2"), timeout=15, what="the next daemon's callback")
    assert story(wordpress, "s2") == [("completed", 200)] and openai_stub.count() == 1


def test_no_claim_thread_outlives_the_daemon(run_daemon, aws, openai_stub, wordpress):
    """A job runs and the daemon stops: every thread the daemon started ends (the workers within a moment of
    run() returning). The claim's pool thread (`claim_0`, a daemon thread since a worker started it) stays,
    blocked on its queue, for as long as the process lives; so does one per daemon built after it."""
    before = set(threading.enumerate())
    upload(aws, "audio/t.wav")
    send_job(aws, "t", "audio/t.wav")
    rd = run_daemon()
    wait_for(lambda: story(wordpress, "t") and settled(aws), timeout=30, what="the job done")
    assert rd.stop() == 0

    def ours() -> list[str]:
        return sorted(t.name for t in threading.enumerate()
                      if t not in before and t.name.startswith(("worker-", "claim", "poller", "housekeeper")))

    with contextlib.suppress(AssertionError):
        wait_for(lambda: not ours(), timeout=3, what="the daemon's threads ended")
    assert ours() == []


STOP_WITH_THE_CLAIM_IN_FLIGHT = '''
import os, pathlib, time
import consumer.fetch as _f
import consumer.records as _r
_flags = pathlib.Path(os.environ["ADVERSARY_FLAGS"])
_create = _r.RecordStore.create
def _create_when_told(self, record):  # the claim is on its way: it reaches S3 when the test says so
    (_flags / "claim_on_the_wire").touch()
    while not (_flags / "go").exists():
        time.sleep(0.05)
    return _create(self, record)
_r.RecordStore.create = _create_when_told
_download = _f.download
def _long_download(*args, **kwargs):  # an hour-long recording over a slow link: still downloading
    while True:
        time.sleep(1)
_f.download = _long_download
'''


def test_sigterm_with_the_claim_in_flight_leaves_no_claim_behind(spawn_daemon, run_daemon, aws, openai_stub,
                                                                  wordpress, tmp_path):
    """Daemon A receives job `sc`; its claim is on the wire (S3 slow to answer) and the recording, a long
    one, is downloading beside it. SIGTERM, SHUTDOWN_GRACE=0: the hand-back finds no handle yet (the claim
    has not answered), so it releases nothing and makes the message visible; `daemon_stopped` is logged.
    The interpreter's exit then joins the claim's pool thread (concurrent.futures joins its workers at exit,
    daemon threads or not), so the claim is written *after* the hand-back, by a process that will never
    release it: the worker that would is still in the (uncancellable) download and dies with the process.
    Daemon B receives the message at once and defers it until A's claim expires (VISIBILITY_TIMEOUT, 30 s
    here; 120 s by default). Before fdc493e the claim ran in a daemon worker thread, which exit did not wait
    for. Promise (worker.py: a handed-back job's claim is released too, "or the instance that takes the
    message over would only meet it and wait")."""
    upload(aws, "audio/sc.wav")
    flags = tmp_path / "flags"
    flags.mkdir()
    first = spawn_daemon({**site_hook(tmp_path, STOP_WITH_THE_CLAIM_IN_FLIGHT), "ADVERSARY_FLAGS": str(flags),
                          "SHUTDOWN_GRACE": "0", "VISIBILITY_TIMEOUT": "30"})
    send_job(aws, "sc", "audio/sc.wav")
    wait_for((flags / "claim_on_the_wire").exists, timeout=30, what="the claim on the wire")
    first.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: first.events("daemon_stopped"), timeout=20, what="daemon_stopped")
    (flags / "go").touch()  # S3 answers the claim now
    assert first.proc.wait(20) == 0
    run_daemon()
    wait_for(lambda: story(wordpress, "sc") or record(aws, "sc").claim is not None, timeout=10, what="a claim")
    with contextlib.suppress(AssertionError):
        wait_for(lambda: story(wordpress, "sc"), timeout=8, what="the next daemon's callback")
    assert story(wordpress, "sc") == [("completed", 200)], record(aws, "sc").claim


# ---------------------------------------------------------------------------------------------- kill -9 at the claim


def test_kill_9_right_after_the_claim_is_written_costs_one_transcription(moto_server, aws, spawn_daemon, run_daemon,
                                                                         openai_stub, wordpress, tmp_path):
    """The daemon is killed (-9) as its claim comes back, its download beside it: the claim outlives it
    until VISIBILITY_TIMEOUT, the next daemon takes the job over, transcribes it once and calls back once,
    and removes the dead process's temp directory."""
    upload(aws, "audio/k.wav")
    first = spawn_daemon({**site_hook(tmp_path, KILL_AT_CLAIM), "VISIBILITY_TIMEOUT": "3"})
    first.wait_ready()  # a start-up failure says so, with its log
    send_job(aws, "k", "audio/k.wav")
    assert first.proc.wait(60) == -9, first.log_path.read_text(errors="replace")[-3000:]
    assert record(aws, "k").claim is not None and not wordpress.received
    dead = tmp_path / "tmp" / "salestrainer-sidecar" / str(first.proc.pid)
    rd = run_daemon(visibility_timeout=3)
    wait_for(lambda: story(wordpress, "k") and settled(aws), timeout=30, what="the job taken over")
    assert story(wordpress, "k") == [("completed", 200)] and openai_stub.count() == 1
    assert not dead.exists() and leftovers(rd) == []


KILL_AT_CLAIM = '''
import os, signal
import consumer.pipeline as _p
_claim = _p.claim
def _claim_then_die(*args, **kwargs):  # the claim is written; the download runs beside it
    _claim(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
_p.claim = _claim_then_die
'''
