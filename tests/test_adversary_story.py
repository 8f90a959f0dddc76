"""Adversarial sequences against issue 12's promises ("One job, one story", docs/contract.md), each against the
real servers (moto in server mode, the OpenAI and WordPress stand-ins on the wire; the daemon as a subprocess
where a crash matters). Each test here reproduces a bug and is marked xfail(strict=True) until it is fixed:
the docstring says the sequence, what happens, and which promise it breaks."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse

from consumer.dlq import redrive
from consumer.records import RecordStore
from consumer.sqs import SqsQueue
from tests.conftest import send_job, upload
from tests.stack import wait_for
from tests.stack.aws import AwsStack
from tests.stack.openai_stub import Reply
from tests.test_job_story import dead_codes, record, story

pytestmark = pytest.mark.timeout(150)


def statuses(wordpress, job_id):
    return [status for status, _ in story(wordpress, job_id)]


def redrive_all(aws, job_ids=None) -> int:
    return redrive(SqsQueue(aws.sqs, aws.dlq_url), SqsQueue(aws.sqs, aws.queue_url), job_ids=job_ids)


def settled(aws):
    return aws.counts() == (0, 0)


# ---------------------------------------------------------------------------------------------- redrive


def test_redriven_undelivered_completed_that_meets_wordpress_down_again_stays_in_the_dlq(
        moto_server, run_daemon, openai_stub, wordpress):
    """WordPress is down on the job's only receive: the DLQ gets it as `callback_undelivered` (as promised).
    The operator redrives while WordPress is still down: the redriven copy re-sends `completed`, meets 503
    again on its last receive, and is... deleted. `already_dead_lettered` reads the `dead_lettered_at` of
    the *first* dead-lettering (JobRecord.redriven only clears it for `failed`), so no DLQ copy is sent.
    The job is gone from both queues and WordPress never acknowledged its transcript.
    Promise (contract, invariant 1): unreachable WordPress -> DLQ `callback_undelivered`; a redrive re-sends."""
    aws = AwsStack.create(moto_server, max_receives=1)
    upload(aws, "audio/u.wav")
    wordpress.statuses.extend([503] * 60)  # down for the whole test (urllib3 retries 503 twice per attempt)
    send_job(aws, "u", "audio/u.wav")
    run_daemon(sqs_queue_url=aws.queue_url, s3_bucket=aws.bucket)
    wait_for(lambda: dead_codes(aws) == ["callback_undelivered"], timeout=60, what="first dead letter")
    sent = len(story(wordpress, "u"))
    assert redrive_all(aws, {"u"}) == 1
    wait_for(lambda: len(story(wordpress, "u")) > sent, timeout=30, what="completed re-sent (and refused)")
    wait_for(lambda: settled(aws), timeout=30, what="the redriven copy settled")
    assert set(statuses(wordpress, "u")) == {"completed"}
    assert dead_codes(aws) == ["callback_undelivered"]  # actual: [] -- the job left both queues


def test_a_redrive_after_max_job_age_tries_a_failed_job_again(run_daemon, aws, openai_stub, wordpress):
    """The recording is missing: `failed` / audio_not_found, dead-lettered. The recording arrives later and
    the operator redrives -- after MAX_JOB_AGE (12 h by default, so: any redrive the next morning). The
    redriven round finds `first_seen` older than MAX_JOB_AGE and fails as `job_expired` without looking.
    Promise (contract, invariant 3): a redrive of a job that did not complete starts a new round, tried again."""
    send_job(aws, "old", "audio/old.wav")
    run_daemon(max_job_age=3)
    wait_for(lambda: dead_codes(aws) == ["audio_not_found"], timeout=30, what="dead letter")
    upload(aws, "audio/old.wav")
    wait_for(lambda: time.time() - record(aws, "old").first_seen > 4, timeout=10, what="older than MAX_JOB_AGE")
    assert redrive_all(aws, {"old"}) == 1
    wait_for(lambda: len(story(wordpress, "old")) == 2, timeout=30, what="the redriven round ended")
    codes = [c.body.get("error", {}).get("code") for c in wordpress.received]
    assert story(wordpress, "old") == [("failed", 200), ("completed", 200)], codes  # actual: failed, failed/job_expired


def test_a_redrive_after_a_misconfigured_callback_is_fixed_re_sends_completed(run_daemon, aws, openai_stub, wordpress):
    """WordPress answers 401 (a wrong WP_SERVER_TOKEN) to the `completed` callback until MAX_JOB_AGE: the DLQ
    gets it as `callback_undelivered`, as documented. The operator fixes the token and redrives, as the
    runbook says. The redriven copy finds the job COMPLETING and older than MAX_JOB_AGE and dead-letters it
    again without sending anything (and, dead_lettered_at being set, even deletes it: see the test above).
    Promise (contract, invariant 1 and "What WordPress answers" 401/403/404): fix the configuration and the
    jobs complete; a redrive re-sends `completed`."""
    upload(aws, "audio/m.wav")
    wordpress.statuses.extend([401] * 200)
    send_job(aws, "m", "audio/m.wav")
    run_daemon(max_job_age=3)
    wait_for(lambda: dead_codes(aws) == ["callback_undelivered"], timeout=60, what="dead letter")
    with wordpress.lock:
        wordpress.statuses.clear()  # the token is fixed
    assert redrive_all(aws, {"m"}) == 1
    wait_for(lambda: story(wordpress, "m")[-1] == ("completed", 200), timeout=20, what="completed re-sent")
    assert openai_stub.count() == 1


# ---------------------------------------------------------------------------------------------- failed after completed


def test_an_invalid_copy_of_a_running_job_does_not_fail_it(run_daemon, aws, openai_stub, wordpress):
    """Job `c` is being transcribed. A second, correctly signed message for the same job_id arrives with an
    s3_key the daemon refuses (`forbidden_input`; likewise a bad language, a foreign bucket, bad metadata).
    Because its record is RUNNING (not `completed`), report_failure sends `failed` for `c` without writing
    the record; then the running delivery finishes and sends `completed`. WordPress holds both.
    Promise (issue 12 "Done when", contract "What WordPress answers"): one kind of terminal outcome per job."""
    upload(aws, "audio/c.wav")
    openai_stub.latency = 4
    send_job(aws, "c", "audio/c.wav")
    run_daemon(concurrency=2)
    wait_for(lambda: openai_stub.count() == 1, timeout=30, what="transcription started")
    send_job(aws, "c", "audio/../c.wav")
    wait_for(lambda: "completed" in statuses(wordpress, "c"), timeout=30, what="completed")
    wait_for(lambda: settled(aws), timeout=30, what="both messages settled")
    assert "failed" not in statuses(wordpress, "c"), story(wordpress, "c")  # actual: failed, completed


def _s3_fails_for(key_suffix: str, armed: threading.Event):
    """A botocore before-send hook: while `armed`, every S3 request for the key answers 503 SlowDown (S3 user
    guide, "Error responses": SlowDown is S3's throttling answer; botocore retries it, then gives up)."""

    class Raw:
        def stream(self, **_: Any):
            yield (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                   b"<Message>Please reduce your request rate.</Message></Error>")

    def hook(request, **_: Any):
        if armed.is_set() and request.url.split("?")[0].endswith(key_suffix):
            return AWSResponse(request.url, 503, {"Content-Type": "application/xml"}, Raw())
        return None

    return hook


def test_an_s3_error_on_the_last_receive_after_completed_sends_no_failed(moto_server, make_settings, openai_stub,
                                                                          wordpress):
    """Receive 1: the transcript is stored, `completed` goes out, WordPress stores it but answers after
    CALLBACK_TIMEOUT (a retry). Receive 2, the last: S3 throttles the job record's requests (SlowDown, a
    few seconds). The claim raises s3_unavailable before any handle exists; settle fails the job and
    report_failure, with no record in hand, sends `failed` / s3_unavailable. WordPress holds `completed`
    then `failed`; the DLQ says s3_unavailable, and a redrive would send `completed` again.
    Promise (invariant 1): once `completed` was attempted, only `completed` is ever sent, on any receive."""
    from consumer.app import build_daemon
    from consumer.aws import make_clients

    aws = AwsStack.create(moto_server, max_receives=2)
    settings = make_settings(sqs_queue_url=aws.queue_url, s3_bucket=aws.bucket, callback_timeout=1)
    sqs, s3 = make_clients(settings)
    armed = threading.Event()
    s3.meta.events.register("before-send.s3.*", _s3_fails_for("/d.job.json", armed))
    upload(aws, "audio/d.wav")
    wordpress.delays.append(3.0)  # stored, answered after CALLBACK_TIMEOUT
    send_job(aws, "d", "audio/d.wav")
    daemon = build_daemon(settings, sqs=sqs, s3=s3)
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    try:
        wait_for(lambda: story(wordpress, "d"), timeout=30, what="completed taken in")
        armed.set()  # S3 throttles the record from now on
        wait_for(lambda: settled(aws) and len(story(wordpress, "d")) >= 1 and dead_codes(aws), timeout=60,
                 what="the last receive settled")
        assert statuses(wordpress, "d") == ["completed"]  # actual: completed, failed (s3_unavailable)
    finally:
        daemon.worker.request_stop()
        runner.join(30)


# ---------------------------------------------------------------------------------------------- job_id reuse


def test_a_job_id_reused_for_another_recording_after_completion_is_dead_lettered(run_daemon, aws, openai_stub,
                                                                                 wordpress):
    """Job `r` completes for audio/a.wav and WordPress acknowledges it. A message for job_id `r` and another
    recording (audio/b.wav) arrives: it is deleted as `job_duplicate`, nothing in the DLQ, no callback.
    Promise (contract "When WordPress hears nothing" and "Error codes"): `job_id_conflict`, a job_id that
    completed for another recording comes again -> the new message is dead-lettered untouched."""
    upload(aws, "audio/a.wav")
    upload(aws, "audio/b.wav")
    send_job(aws, "r", "audio/a.wav")
    run_daemon()
    wait_for(lambda: record_acknowledged(aws, "r"), timeout=30, what="completed and acknowledged")
    send_job(aws, "r", "audio/b.wav")
    wait_for(lambda: settled(aws), timeout=30, what="the second message settled")
    assert dead_codes(aws) == ["job_id_conflict"]  # actual: [] -- deleted as a duplicate


def record_acknowledged(aws, job_id) -> bool:
    found = RecordStore(aws.s3, aws.bucket, "transcripts/").read(job_id)
    return bool(found and found[0] is not None and found[0].acknowledged_at)


def test_a_new_recording_for_a_failed_job_id_is_not_silently_dropped(run_daemon, aws, openai_stub, wordpress):
    """Post 7's recording is missing: `failed` / audio_not_found, one DLQ copy. The user uploads a new
    recording and WordPress enqueues job_id 7 again (the contract's own PHP uses the post ID as job_id) with
    the new s3_key. The daemon reads the record (FAILED, dead_lettered_at set), raises the *old* error,
    sends no callback (already acknowledged), sends no DLQ copy (already dead-lettered) and deletes the
    message. WordPress waits forever; nothing in the DLQ or the log's error codes says what happened.
    Promise (contract "When WordPress hears nothing": each case is dead-lettered; `job_id_conflict` for a
    reused job_id; issue 12: no job that never ends)."""
    send_job(aws, "7", "audio/first.wav")
    run_daemon()
    wait_for(lambda: dead_codes(aws) == ["audio_not_found"], timeout=30, what="first dead letter")
    upload(aws, "audio/second.wav")
    send_job(aws, "7", "audio/second.wav")
    wait_for(lambda: settled(aws), timeout=30, what="the second message settled")
    heard = len(story(wordpress, "7")) == 2
    assert heard or len(aws.dlq_messages()) == 2  # actual: WordPress heard once, one dead letter


# ---------------------------------------------------------------------------------------------- crashes


def test_a_legacy_job_moved_by_the_redrive_policy_keeps_its_id_on_redrive(moto_server, spawn_daemon, run_daemon,
                                                                          openai_stub, wordpress):
    """A legacy `{"s3_key"}` job (job_id = its MessageId M) is received on its last permitted receive and the
    daemon is killed (-9) mid-transcription. SQS's redrive policy moves it to the DLQ on the next receive,
    keeping MessageId M (`dlq ls` shows M). `dlq redrive --job-id M` moves it -- with its original attributes
    only, no `job_id` -- so the copy is named by its new MessageId: transcribed again under a new record and
    called back under a job_id WordPress never saw.
    Promise (contract, invariant 4): a legacy job is named by its first MessageId across requeues and redrives."""
    aws = AwsStack.create(moto_server, max_receives=1)
    upload(aws, "audio/lg.wav")
    openai_stub.latency = 120
    first = spawn_daemon({"SQS_QUEUE_URL": aws.queue_url, "S3_BUCKET": aws.bucket, "VISIBILITY_TIMEOUT": "3"})
    first.wait_ready()
    legacy = send_job(aws, None, None, body=json.dumps({"s3_key": "audio/lg.wav"}))
    wait_for(lambda: openai_stub.count() == 1, timeout=30, what="transcription started")
    assert record(aws, legacy).s3_key == "audio/lg.wav"
    first.proc.kill()
    first.proc.wait(10)
    openai_stub.latency = 0
    run_daemon(sqs_queue_url=aws.queue_url, s3_bucket=aws.bucket)  # its receive lets SQS move the message
    wait_for(lambda: [m["MessageId"] for m in aws.dlq_messages()] == [legacy], timeout=30, what="policy move")
    assert redrive_all(aws, {legacy}) == 1
    wait_for(lambda: wordpress.received, timeout=30, what="the redriven job called back")
    assert [c.body["job_id"] for c in wordpress.received] == [legacy]  # actual: the redrive copy's MessageId


SITE_HOOK = '''
import os, signal
if os.environ.get("ADVERSARY_KILL_AT") == "mark_dead_lettered":
    import consumer.pipeline as _p
    def _die(self, attempt):  # the DLQ copy is sent; the record has not said so yet
        os.kill(os.getpid(), signal.SIGKILL)
    _p.Pipeline.mark_dead_lettered = _die
if os.environ.get("ADVERSARY_KILL_AT") == "failed_callback":
    import consumer.deliver as _d
    _post = _d.Deliverer.post
    def _post_or_die(self, payload):  # `failed` is written to the record as attempted, not yet sent
        if payload.status == "failed":
            os.kill(os.getpid(), signal.SIGKILL)
        return _post(self, payload)
    _d.Deliverer.post = _post_or_die
'''


def hooked(tmp_path, kill_at: str) -> dict[str, str]:
    """Environment for a daemon subprocess that kills itself (-9) at `kill_at` (a sitecustomize hook)."""
    import os

    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(SITE_HOOK)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])),
            "ADVERSARY_KILL_AT": kill_at}


@pytest.mark.xfail(strict=True, reason="the DLQ send and its dead_lettered_at mark are two writes: a crash "
                                       "between them sends a second DLQ copy on the next receive")
def test_kill_9_between_the_dlq_send_and_its_mark_sends_one_dlq_copy(spawn_daemon, run_daemon, aws, openai_stub,
                                                                      wordpress, tmp_path):
    """Job `k`'s recording is missing: `failed` acknowledged, the DLQ copy sent, then the daemon is killed
    (-9) before the record says `dead_lettered_at` (a sitecustomize hook kills it at exactly that call).
    The message comes back; the next daemon sees FAILED without the mark and sends a second DLQ copy.
    Promise (contract, invariant 2, "whatever the sequence of crashes"): the DLQ gets one copy."""
    first = spawn_daemon({**hooked(tmp_path, "mark_dead_lettered"), "VISIBILITY_TIMEOUT": "3"})
    send_job(aws, "k", "audio/missing-k.wav")
    assert first.proc.wait(60) == -9  # killed by the hook, right after the DLQ send
    assert statuses(wordpress, "k") == ["failed"]
    run_daemon(visibility_timeout=3)
    wait_for(lambda: settled(aws), timeout=30, what="the returning copy settled")
    assert statuses(wordpress, "k") == ["failed"]  # the acknowledged `failed` is not sent again: holds
    assert dead_codes(aws) == ["audio_not_found"]  # actual: two copies


def test_kill_9_on_the_last_receive_before_the_failed_callback_still_tells_wordpress(
        moto_server, spawn_daemon, run_daemon, openai_stub, wordpress, tmp_path):
    """Job `f` meets OpenAI 500s until the daemon gives up (MaxReceiveCount 3: the daemon's last receive is
    the second, the policy's third is kept in reserve). The record is written `failed` attempted, then the
    daemon is killed (-9) before the callback goes out (an OOM kill, a host reboot). The reserve receive
    finds the record FAILING and tells WordPress; SQS never moves the job silently.
    (With MaxReceiveCount 1 or 2 there is no receive to spare: the runbook says to keep it at 3 or more.)"""
    aws = AwsStack.create(moto_server, max_receives=3)
    upload(aws, "audio/f.wav")
    openai_stub.script.extend([Reply(500), Reply(500)])
    first = spawn_daemon({**hooked(tmp_path, "failed_callback"), "SQS_QUEUE_URL": aws.queue_url,
                          "S3_BUCKET": aws.bucket, "VISIBILITY_TIMEOUT": "3", "RETRY_BASE_DELAY": "1",
                          "RETRY_MAX_DELAY": "1"})
    send_job(aws, "f", "audio/f.wav")
    assert first.proc.wait(60) == -9  # killed by the hook with `failed` attempted, on receive 2
    assert record(aws, "f").outcome == "failed" and wordpress.received == []
    run_daemon(sqs_queue_url=aws.queue_url, s3_bucket=aws.bucket, visibility_timeout=3)
    wait_for(lambda: settled(aws) and aws.counts(aws.dlq_url) != (0, 0), timeout=30, what="the message settled")
    wait_for(lambda: statuses(wordpress, "f") == ["failed"], timeout=15, what="WordPress told `failed`")
    assert dead_codes(aws) == ["transcription_unavailable"]


def test_an_invalid_job_whose_failed_callback_is_misconfigured_ends(moto_server, run_daemon, openai_stub, wordpress):
    """A signed job with a refused s3_key (`forbidden_input`, its job_id readable) must be called back
    `failed`. WordPress answers 401 (a wrong token) for longer than MAX_JOB_AGE. `callback_misconfigured`
    is a deferral; the age bound is `attempt.expired`, which is only computed from a job record, and a
    message that failed validation never claims one. So the message is retried and, on its last receive,
    re-sent fresh -- forever (here MAX_JOB_AGE=2 s; the test gives it 25 s).
    Promise (issue 12: no job lives forever; contract 401/403/404 row: a job still unacknowledged after
    MAX_JOB_AGE is dead-lettered)."""
    aws = AwsStack.create(moto_server, max_receives=2)
    wordpress.statuses.extend([401] * 500)
    send_job(aws, "v", "audio/../v.wav")
    run_daemon(sqs_queue_url=aws.queue_url, s3_bucket=aws.bucket, max_job_age=2)
    wait_for(lambda: len(story(wordpress, "v")) >= 3, timeout=30, what="several refused callbacks")
    wait_for(lambda: aws.counts(aws.dlq_url) != (0, 0), timeout=25, what="dead-lettered after MAX_JOB_AGE")
