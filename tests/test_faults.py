"""Fault injection with real processes and servers: no job lost, none transcribed twice (issue 3, 10a-f)."""

from __future__ import annotations

import json
import signal
import time
import wave

import numpy as np
import pytest

from tests.conftest import send_job, upload
from tests.stack import wait_for
from tests.stack.aws import AwsStack
from tests.stack.openai_stub import Reply

pytestmark = pytest.mark.timeout(180)


def completed(wordpress, job_id):
    return [b for b in wordpress.terminal(job_id) if b["status"] == "completed"]


def mid_transcription(spawn_daemon, aws, openai_stub, job_id, *, latency, env):
    """A daemon subprocess in the middle of transcribing job_id (the stand-in holds the request)."""
    upload(aws, f"audio/{job_id}.wav")
    openai_stub.latency = latency
    daemon = spawn_daemon(env)
    daemon.wait_ready()
    send_job(aws, job_id, f"audio/{job_id}.wav")
    wait_for(lambda: openai_stub.count() == 1, timeout=30, what="transcription started")
    return daemon


@pytest.mark.e2e
def test_kill_9_mid_transcription_then_restart_completes_once(spawn_daemon, aws, openai_stub, wordpress):
    # The first daemon dies while the request hangs.
    first = mid_transcription(spawn_daemon, aws, openai_stub, "job-kill", latency=120, env={"VISIBILITY_TIMEOUT": "5"})
    first.proc.kill()
    first.proc.wait(10)

    openai_stub.latency = 0
    second = spawn_daemon({"VISIBILITY_TIMEOUT": "5"})
    wait_for(lambda: completed(wordpress, "job-kill"), timeout=60, what="completed after restart")
    wait_for(lambda: aws.counts() == (0, 0), timeout=30, what="queue empty")
    assert len(wordpress.terminal("job-kill")) == 1
    assert openai_stub.count() == 2  # the killed attempt never finished, so it was not paid twice
    assert wordpress.terminal("job-kill")[0]["attempt"] == 2
    second.proc.send_signal(signal.SIGTERM)
    assert second.proc.wait(30) == 0


def test_flaky_upstreams_every_job_one_terminal_callback(run_daemon, aws, openai_stub, wordpress):
    upload(aws, "audio/ok.wav")
    openai_stub.script.extend([
        Reply(429, {"retry-after": "1"}, {"message": "rate limited"}),
        Reply(500),
        Reply(delay=4),  # longer than TRANSCRIBE_TIMEOUT: the client times out
    ])
    wordpress.statuses.extend([503] * 6)  # WordPress down for a while, then back
    jobs = [f"flaky-{i}" for i in range(4)]
    for job in jobs:
        send_job(aws, job, "audio/ok.wav")
    send_job(aws, "flaky-missing", "audio/does-not-exist.wav")
    run_daemon(concurrency=2, transcribe_timeout=1.5, visibility_timeout=10)

    wait_for(lambda: all(wordpress.terminal(j) for j in [*jobs, "flaky-missing"]), timeout=120,
             what="a terminal callback for every job")
    wait_for(lambda: aws.counts() == (0, 0), timeout=60, what="source queue empty")
    for job in jobs:
        [body] = wordpress.terminal(job)
        assert body["status"] == "completed"
    [failed] = wordpress.terminal("flaky-missing")
    assert failed["status"] == "failed" and failed["error"]["code"] == "audio_not_found"
    assert failed["error"]["retryable"] is False
    [dead] = wait_for(lambda: aws.dlq_messages(), timeout=30, what="dead letter")
    attrs = {k: v["StringValue"] for k, v in dead["MessageAttributes"].items()}
    assert attrs["error_code"] == "audio_not_found" and attrs["source_message_id"]
    assert "signature" in attrs and attrs["failed_at"].isdigit()
    # One request per job plus one per injected OpenAI failure: callback-only failures reused the
    # stored transcript instead of paying for a second transcription.
    assert openai_stub.count() == len(jobs) + 3


def test_job_slower_than_visibility_timeout_is_not_given_to_another_worker(run_daemon, aws, openai_stub, wordpress):
    upload(aws, "audio/slow.wav")
    openai_stub.latency = 8
    send_job(aws, "job-slow", "audio/slow.wav")
    a = run_daemon(visibility_timeout=3, concurrency=2)
    b = run_daemon(visibility_timeout=3, concurrency=2)
    wait_for(lambda: wordpress.terminal("job-slow"), timeout=60, what="slow job callback")
    wait_for(lambda: aws.counts() == (0, 0), timeout=30, what="queue empty")
    assert openai_stub.count() == 1
    [body] = wordpress.terminal("job-slow")
    assert body["attempt"] == 1
    beats = sum(d.daemon.metrics.heartbeats.labels("ok")._value.get() for d in (a, b))
    assert beats >= 2


@pytest.mark.e2e
def test_sigterm_during_a_job_lets_it_finish_and_exits_0(spawn_daemon, aws, openai_stub, wordpress):
    daemon = mid_transcription(spawn_daemon, aws, openai_stub, "job-term", latency=3, env={"SHUTDOWN_GRACE": "30"})
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0
    assert [b["status"] for b in wordpress.terminal("job-term")] == ["completed"]
    assert aws.counts() == (0, 0)


@pytest.mark.e2e
def test_sigterm_past_the_grace_releases_the_job_at_once(spawn_daemon, aws, openai_stub, wordpress):
    daemon = mid_transcription(spawn_daemon, aws, openai_stub, "job-release", latency=120,
                               env={"SHUTDOWN_GRACE": "1", "VISIBILITY_TIMEOUT": "600"})
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(20) == 0
    assert daemon.events("job_released")
    # Visible again straight away (not after the 600 s visibility timeout): another instance can take it.
    wait_for(lambda: aws.counts() == (1, 0), timeout=10, what="message visible again")
    assert wordpress.terminal("job-release") == []


@pytest.mark.e2e
def test_second_signal_exits_immediately(spawn_daemon, aws, openai_stub):
    daemon = mid_transcription(spawn_daemon, aws, openai_stub, "job-sig2", latency=120, env={"SHUTDOWN_GRACE": "120"})
    daemon.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: daemon.events("shutdown_started"), timeout=10, what="graceful shutdown begun")
    daemon.proc.send_signal(signal.SIGINT)
    assert daemon.proc.wait(10) == 128 + signal.SIGINT


def test_same_job_sent_twice_one_transcription_one_callback(run_daemon, aws, openai_stub, wordpress):
    upload(aws, "audio/d.wav")
    openai_stub.latency = 1
    send_job(aws, "job-dup", "audio/d.wav")
    send_job(aws, "job-dup", "audio/d.wav")
    rd = run_daemon(concurrency=4)
    wait_for(lambda: aws.counts() == (0, 0), timeout=60, what="both copies settled")
    assert openai_stub.count() == 1
    assert len(wordpress.terminal("job-dup")) == 1
    # A third copy long after completion is recognised from the stored result and dropped quietly.
    send_job(aws, "job-dup", "audio/d.wav")
    wait_for(lambda: rd.daemon.metrics.jobs.labels("duplicate")._value.get() >= 1, timeout=30, what="duplicate")
    wait_for(lambda: aws.counts() == (0, 0), timeout=30, what="third copy deleted")
    assert openai_stub.count() == 1 and len(wordpress.terminal("job-dup")) == 1


def test_a_duplicate_of_a_delivered_job_whose_recording_is_gone_is_still_a_duplicate(run_daemon, aws, openai_stub,
                                                                                       wordpress):
    """WordPress may delete the recording once it has the transcript; a late copy of the job must not turn
    the finished job into a `failed` one (audio_not_found)."""
    upload(aws, "audio/gone.wav")
    send_job(aws, "job-gone", "audio/gone.wav")
    rd = run_daemon()
    wait_for(lambda: aws.counts() == (0, 0), timeout=30, what="job settled")
    aws.s3.delete_object(Bucket=aws.bucket, Key="audio/gone.wav")
    send_job(aws, "job-gone", "audio/gone.wav")
    wait_for(lambda: rd.daemon.metrics.jobs.labels("duplicate")._value.get() >= 1, timeout=30, what="duplicate")
    wait_for(lambda: aws.counts() == (0, 0), timeout=30, what="the copy deleted")
    assert [b["status"] for b in wordpress.terminal("job-gone")] == ["completed"]
    assert aws.dlq_messages() == []


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_three_daemons_share_sixty_jobs(spawn_daemon, aws, openai_stub, wordpress):
    upload(aws, "audio/m.wav")
    openai_stub.latency = 0.3
    daemons = [spawn_daemon({"CONCURRENCY": "3"}) for _ in range(3)]
    for d in daemons:
        d.wait_ready()
    jobs = [f"multi-{i:02d}" for i in range(60)]
    for job in jobs:
        send_job(aws, job, "audio/m.wav")
    wait_for(lambda: len(wordpress.accepted()) >= 60, timeout=240, what="60 callbacks")
    wait_for(lambda: aws.counts() == (0, 0), timeout=30, what="queue empty")
    for job in jobs:
        assert [b["status"] for b in wordpress.terminal(job)] == ["completed"], job
    assert openai_stub.count() == 60
    for d in daemons:
        d.proc.send_signal(signal.SIGTERM)
    for d in daemons:
        assert d.proc.wait(30) == 0
        assert len(d.events("job_completed")) > 0  # every process did some of the work


def test_last_receive_before_redrive_is_final(moto_server, make_settings, run_daemon, openai_stub, wordpress):
    aws = AwsStack.create(moto_server, max_receives=2)
    upload(aws, "audio/x.wav")
    openai_stub.script.extend([Reply(500), Reply(500)])
    send_job(aws, "job-final", "audio/x.wav")
    run_daemon(sqs_queue_url=aws.queue_url, s3_bucket=aws.bucket)
    [body] = wait_for(lambda: wordpress.terminal("job-final"), timeout=60, what="failed callback")
    assert body["status"] == "failed" and body["attempt"] == 2
    assert body["error"]["code"] == "transcription_unavailable" and body["error"]["retryable"] is True
    [dead] = wait_for(lambda: aws.dlq_messages(), timeout=30, what="dead letter")
    assert dead["MessageAttributes"]["error_code"]["StringValue"] == "transcription_unavailable"
    assert aws.counts() == (0, 0)


def test_rate_limit_pauses_every_worker(run_daemon, aws, openai_stub, wordpress):
    upload(aws, "audio/rl.wav")
    openai_stub.script.append(Reply(429, {"retry-after": "2"}, {"message": "slow down"}))
    for i in range(3):
        send_job(aws, f"rl-{i}", "audio/rl.wav")
    rd = run_daemon(concurrency=3)
    wait_for(lambda: len(wordpress.accepted()) == 3, timeout=60, what="all three completed")
    assert rd.daemon.metrics.backpressure_seconds._value.get() >= 1.5
    assert rd.daemon.metrics.errors.labels("transcribe", "rate_limited")._value.get() == 1


def test_copy_delivered_elsewhere_while_running_waits_for_the_claim(run_daemon, aws, openai_stub, wordpress):
    """A message whose visibility is lost mid-job (as when an extension fails) reaches another daemon;
    the job's claim makes that daemon wait instead of transcribing a second time."""
    upload(aws, "audio/lease.wav")
    openai_stub.latency = 4
    send_job(aws, "job-lease", "audio/lease.wav")
    a = run_daemon(concurrency=1, retry_base_delay=1, retry_max_delay=2)
    wait_for(lambda: openai_stub.count() == 1, timeout=30, what="first transcription started")
    [entry] = list(a.worker.inflight.values())
    aws.sqs.change_message_visibility(QueueUrl=aws.queue_url, ReceiptHandle=entry.message.receipt_handle,
                                      VisibilityTimeout=0)  # the visibility is lost
    b = run_daemon(concurrency=1, retry_base_delay=1, retry_max_delay=2)
    wait_for(lambda: b.daemon.metrics.errors.labels("claim", "job_in_progress")._value.get() >= 1, timeout=30,
             what="the second daemon meets the claim")
    wait_for(lambda: wordpress.terminal("job-lease"), timeout=60, what="callback")
    wait_for(lambda: aws.counts() == (0, 0), timeout=60, what="queue empty")
    assert openai_stub.count() == 1
    assert len(wordpress.terminal("job-lease")) == 1


def test_same_job_twice_on_two_daemons(run_daemon, aws, openai_stub, wordpress):
    upload(aws, "audio/dd.wav")
    openai_stub.latency = 2
    send_job(aws, "job-dd", "audio/dd.wav")
    send_job(aws, "job-dd", "audio/dd.wav")
    run_daemon(concurrency=1)
    run_daemon(concurrency=1)
    wait_for(lambda: aws.counts() == (0, 0), timeout=60, what="both copies settled")
    assert openai_stub.count() == 1 and len(wordpress.terminal("job-dd")) == 1


def test_a_waiting_copy_on_its_last_receive_is_resent_not_dead_lettered(moto_server, run_daemon, openai_stub,
                                                                        wordpress):
    """With maxReceiveCount 1, the copy that meets the claim has no receive left: it is sent again fresh
    (and later recognised as a duplicate) instead of being failed or dead-lettered."""
    aws = AwsStack.create(moto_server, max_receives=1)
    upload(aws, "audio/last.wav")
    openai_stub.latency = 2
    send_job(aws, "job-last", "audio/last.wav")
    send_job(aws, "job-last", "audio/last.wav")
    rd = run_daemon(sqs_queue_url=aws.queue_url, s3_bucket=aws.bucket, concurrency=2, visibility_timeout=5)
    wait_for(lambda: wordpress.terminal("job-last"), timeout=60, what="callback")
    wait_for(lambda: rd.daemon.metrics.jobs.labels("duplicate")._value.get() >= 1, timeout=60, what="duplicate")
    wait_for(lambda: aws.counts() == (0, 0), timeout=30, what="queue empty")
    assert [b["status"] for b in wordpress.terminal("job-last")] == ["completed"]
    assert openai_stub.count() == 1 and aws.dlq_messages() == []


def sigterm_with_the_callback_on_the_wire(spawn_daemon, aws, wordpress, job_id, key):
    """A daemon subprocess stopped (grace 1 s) while WordPress holds job_id's callback past the grace,
    then let through; returns the daemon once it has exited 0 without handing the job back."""
    wordpress.hold = True
    daemon = spawn_daemon({"SHUTDOWN_GRACE": "1", "CALLBACK_TIMEOUT": "60"})
    daemon.wait_ready()
    send_job(aws, job_id, key)
    wait_for(lambda: wordpress.held == 1, timeout=30, what="the callback on the wire")
    daemon.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: daemon.events("grace_expired"), timeout=30, what="the grace over")
    wordpress.release.set()
    assert daemon.proc.wait(30) == 0
    assert not daemon.events("job_released")
    return daemon


@pytest.mark.e2e
def test_sigterm_past_the_grace_lets_a_failure_callback_on_the_wire_finish(spawn_daemon, aws, wordpress):
    """A job being settled when the grace runs out is not handed back (another instance would run it
    again and WordPress would hear twice): its callback finishes, then it is dead-lettered."""
    sigterm_with_the_callback_on_the_wire(spawn_daemon, aws, wordpress, "job-settling", "audio/does-not-exist.wav")
    assert [b["status"] for b in wordpress.terminal("job-settling")] == ["failed"]
    [dead] = wait_for(lambda: aws.dlq_messages(), timeout=10, what="dead letter")
    assert dead["MessageAttributes"]["error_code"]["StringValue"] == "audio_not_found"
    assert aws.counts() == (0, 0)


@pytest.mark.e2e
def test_sigterm_past_the_grace_lets_a_completed_callback_on_the_wire_finish(spawn_daemon, aws, openai_stub,
                                                                             wordpress):
    """Likewise a job whose `completed` callback is on the wire: it is finished and deleted, not handed
    back for another instance to call back a second time."""
    upload(aws, "audio/wire.wav")
    sigterm_with_the_callback_on_the_wire(spawn_daemon, aws, wordpress, "job-wire", "audio/wire.wav")
    assert [b["status"] for b in wordpress.terminal("job-wire")] == ["completed"]
    assert aws.counts() == (0, 0)


def test_heartbeats_go_on_while_a_failure_callback_is_slow(run_daemon, aws, wordpress):
    """Settling a failed job starts with its callback, which may take a while: the message stays hidden
    meanwhile (no second delivery, no second `failed` callback)."""
    wordpress.hold = True
    rd = run_daemon(visibility_timeout=30, heartbeat_interval=1, callback_timeout=60)
    send_job(aws, "job-slowcb", "audio/does-not-exist.wav")
    wait_for(lambda: wordpress.held == 1, timeout=30, what="the failure callback on the wire")
    beats = rd.daemon.metrics.heartbeats.labels("ok")
    seen = beats._value.get()
    wait_for(lambda: beats._value.get() >= seen + 3, timeout=30, what="heartbeats during the callback")
    wordpress.release.set()
    wait_for(lambda: aws.dlq_messages(), timeout=30, what="dead letter")
    wait_for(lambda: aws.counts() == (0, 0), timeout=30, what="source queue empty")
    assert wordpress.held == 1 and [b["status"] for b in wordpress.terminal("job-slowcb")] == ["failed"]


def test_the_claim_is_held_until_the_failure_callback_is_done(run_daemon, aws, wordpress):
    """The failure callback is part of the job: a copy delivered meanwhile must meet the claim and wait,
    not run the job beside it (and call WordPress back a second time)."""
    wordpress.hold = True
    run_daemon(callback_timeout=60)
    send_job(aws, "job-held", "audio/does-not-exist.wav")
    wait_for(lambda: wordpress.held == 1, timeout=30, what="the failure callback on the wire")
    key = "transcripts/job-held.job.json"

    def record():
        return json.loads(aws.s3.get_object(Bucket=aws.bucket, Key=key)["Body"].read())

    held = record()
    assert held["job_id"] == "job-held" and held["claim"] and held["outcome"] == "failed"
    wordpress.release.set()
    wait_for(lambda: aws.dlq_messages(), timeout=30, what="dead letter")
    wait_for(lambda: "claim" not in record(), timeout=30, what="the claim released once settled")
    assert record()["acknowledged_at"] and record()["dead_lettered_at"]


def _long_wav(path, seconds: int, rate: int = 8000) -> None:
    """A tone with a pause every 7 s: over the model's duration cap, so it is sent in chunks."""
    t = np.arange(seconds * rate) / rate
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) * ((t.astype(int) % 7) != 6)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((tone * 32767).astype("<i2").tobytes())


@pytest.mark.e2e
def test_sigterm_exits_at_once_while_a_released_jobs_chunks_still_wait_on_openai(spawn_daemon, aws, openai_stub,
                                                                                  wordpress, tmp_path):
    """The chunks of a long recording go out from a thread pool whose threads the interpreter would wait
    for: a released job's requests, still on the wire, must not keep the process alive."""
    path = tmp_path / "long.wav"
    _long_wav(path, 1300)  # gpt-transcribe takes at most 1260 s (1400 s less the margin) per request
    upload(aws, "audio/long.wav", path)
    openai_stub.latency = 120
    daemon = spawn_daemon({"SHUTDOWN_GRACE": "1", "TRANSCRIBE_TIMEOUT": "150", "TRANSCRIBE_PARALLELISM": "2"})
    daemon.wait_ready()
    send_job(aws, "job-chunks", "audio/long.wav")
    wait_for(lambda: openai_stub.count() == 2, timeout=90, what="both chunks on the wire")
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(20) == 0
    assert daemon.events("job_released")
    wait_for(lambda: aws.counts() == (1, 0), timeout=10, what="message visible again")
    assert wordpress.received == []


def test_a_job_released_at_shutdown_stores_nothing_and_never_calls_back(run_daemon, aws, openai_stub, wordpress):
    """Handed back at shutdown, the job belongs to whoever receives it next: the transcription that was
    already on the wire may still come back, but it is neither stored nor sent to WordPress."""
    upload(aws, "audio/rel.wav")
    openai_stub.latency = 60
    send_job(aws, "job-rel", "audio/rel.wav")
    rd = run_daemon(shutdown_grace=0.2)
    wait_for(lambda: openai_stub.count() == 1, timeout=30, what="transcription started")
    assert rd.stop() == 0
    wait_for(lambda: aws.counts() == (1, 0), timeout=10, what="the message handed back")
    openai_stub.release.set()  # the transcription comes back after all
    wait_for(lambda: not rd.worker.inflight, timeout=30, what="the released worker done")
    assert wordpress.received == []
    assert "Contents" not in aws.s3.list_objects_v2(Bucket=aws.bucket, Prefix="transcripts/job-rel.json")


def test_a_job_whose_claim_is_taken_over_stops_before_storing(run_daemon, aws, openai_stub, wordpress):
    """When a renewal finds the claim in other hands, the job runs elsewhere now: this delivery stores
    nothing, calls nobody back, and waits like any copy that meets a held claim."""
    from consumer.records import RecordStore

    upload(aws, "audio/taken.wav")
    openai_stub.latency = 60
    send_job(aws, "job-taken", "audio/taken.wav")
    rd = run_daemon(visibility_timeout=30, heartbeat_interval=1, retry_base_delay=30, retry_max_delay=30)
    wait_for(lambda: openai_stub.count() == 1, timeout=30, what="transcription started")
    [entry] = list(rd.worker.inflight.values())
    store = RecordStore(aws.s3, aws.bucket, "transcripts/")
    mine, etag = store.read("job-taken")
    store.replace(mine.claimed("elsewhere", time.time() + 600), etag)
    wait_for(lambda: entry.attempt.cancelled == "job_in_progress", timeout=30, what="the renewal finds it taken")
    openai_stub.release.set()
    wait_for(lambda: rd.daemon.metrics.jobs.labels("retried")._value.get() == 1, timeout=30, what="deferred")
    assert rd.daemon.metrics.errors.labels("store", "job_in_progress")._value.get() == 1
    assert wordpress.received == []
    record = store.read("job-taken")[0]
    assert record.transcript is None and record.outcome is None
    assert record.claim.owner == "elsewhere"  # not released from under its holder


def test_the_last_long_poll_at_shutdown_hands_its_messages_back(run_daemon, aws, openai_stub, wordpress):
    """A message that the long poll still out at shutdown brings back is made visible again before the
    daemon exits, instead of staying hidden for VISIBILITY_TIMEOUT (and spending a receive)."""
    rd = run_daemon(poll_wait_seconds=15, visibility_timeout=600)
    polls = rd.daemon.metrics.sqs_requests.labels("ReceiveMessage")
    wait_for(lambda: polls._value.get() >= 1, timeout=10, what="a long poll under way")
    rd.worker.request_stop()
    # Sent after the stop and delayed, so only the poll already out can receive it, after the stop.
    body = json.dumps({"job_id": "job-late", "s3_key": "audio/late.wav"})
    aws.sqs.send_message(QueueUrl=aws.queue_url, MessageBody=body, DelaySeconds=1)
    rd.thread.join(30)
    assert not rd.thread.is_alive()
    assert aws.counts() == (1, 0)  # visible at once, not in flight
    assert wordpress.received == []
