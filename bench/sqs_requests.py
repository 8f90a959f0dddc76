"""Item 2: SQS requests per completed job (trickle and backlog) and per idle minute, next to what a job costs.

Counted twice: by the daemon itself (`sidecar_sqs_requests_total{operation}` on /metrics) and by a
counting HTTP proxy in front of moto that the daemon's AWS_ENDPOINT_URL points at. The proxy also sees
S3 requests (by method), whether a ReceiveMessage came back empty, and how many entries a batch carried.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from bench.common import Bench, figure
from bench.stack import CountingProxy, DaemonProcess, Feeder, send_job

SQS_PRICE = 0.40 / 1e6  # $ per request (standard queue, after the free tier; each 64 KB chunk is one)
S3_PUT_PRICE, S3_GET_PRICE = 0.005 / 1000, 0.0004 / 1000  # S3 Standard, us-east-1
TRANSCRIPTION_PER_JOB = 0.006 * 10  # gpt-transcribe at $0.006/min, a typical 10-minute call
IDLE_TARGET = 3.5  # requests a minute per process
MINUTES_PER_MONTH = 60 * 24 * 30


def _diff(after: Counter[str], before: Counter[str]) -> Counter[str]:
    return Counter({k: after[k] - before[k] for k in after if after[k] - before[k]})


def _snap(proxy: CountingProxy, d: DaemonProcess) -> tuple[Counter[str], Counter[str], float]:
    return proxy.snapshot(), d.sqs_requests(), time.monotonic()


def _requests(proxy_counts: Counter[str]) -> int:
    return sum(v for k, v in proxy_counts.items() if k.startswith("sqs:") and k.count(":") == 1
               and "(" not in k)


def _per_job(b: Bench, label: str, seen: Counter[str], metrics: Counter[str], jobs: int) -> dict[str, Any]:
    sqs_ops = {k.removeprefix("sqs:"): v for k, v in seen.items() if k.startswith("sqs:")}
    s3 = {k.removeprefix("s3:"): v for k, v in seen.items() if k.startswith("s3:")}
    total = _requests(seen)
    puts, gets = s3.get("PUT", 0) + s3.get("POST", 0), s3.get("GET", 0) + s3.get("HEAD", 0)
    row = {
        "jobs": jobs,
        "sqs_requests": dict(sorted(sqs_ops.items())),
        "sqs_requests_per_job": round(total / jobs, 3),
        "by_operation_per_job": {k: round(v / jobs, 3) for k, v in sorted(sqs_ops.items())
                                 if "(" not in k and ":" not in k},
        "metrics_agree_with_proxy": _agree(seen, metrics),
        "metrics": {k.removeprefix("sqs:"): v for k, v in sorted(metrics.items())},
        "s3_requests_per_job": {k: round(v / jobs, 3) for k, v in sorted(s3.items())},
        "sqs_cost_per_job_usd": total / jobs * SQS_PRICE,
        "s3_cost_per_job_usd": (puts * S3_PUT_PRICE + gets * S3_GET_PRICE) / jobs,
    }
    b.say(f"sqs: {label}: {total / jobs:.2f} SQS requests/job {row['by_operation_per_job']}; "
          f"metrics agree: {row['metrics_agree_with_proxy']}")
    return row


def _agree(proxy: Counter[str], metrics: Counter[str]) -> bool:
    ops = {k for k in proxy if k.startswith("sqs:") and k.count(":") == 1 and "(" not in k} | set(metrics)
    return all(proxy[k] == metrics[k] for k in ops)


def idle_and_trickle(b: Bench) -> tuple[dict[str, Any], dict[str, Any]]:
    window = 60.0 if b.quick else 120.0
    jobs, gap = (10, 2.0) if b.quick else (30, 2.0)
    aws = b.stack()
    key = b.tiny_key(aws)
    proxy = CountingProxy(b.moto.endpoint)
    try:
        with b.daemon(aws, endpoint=proxy.endpoint, CONCURRENCY=4, POLL_WAIT_SECONDS=20,
                      QUEUE_METRICS_INTERVAL=60) as d:
            time.sleep(5.0)  # past start-up: the RedrivePolicy read and the first depth poll
            p0, m0, t0 = _snap(proxy, d)
            b.say(f"sqs: idle for {window:.0f} s (POLL_WAIT_SECONDS=20, QUEUE_METRICS_INTERVAL=60)")
            time.sleep(window)
            p1, m1, t1 = _snap(proxy, d)
            seen, metrics, minutes = _diff(p1, p0), _diff(m1, m0), (t1 - t0) / 60
            receives = seen["sqs:ReceiveMessage"] / minutes
            depth = seen["sqs:GetQueueAttributes"] / minutes
            idle = {"window_s": round(t1 - t0, 1), "requests": dict(sorted(seen.items())),
                    "metrics": {k.removeprefix("sqs:"): v for k, v in sorted(metrics.items())},
                    "metrics_agree_with_proxy": _agree(seen, metrics),
                    "receive_per_min": round(receives, 2), "depth_polls_per_min": round(depth, 2),
                    "total_per_min": round(_requests(seen) / minutes, 2),
                    "month_usd_per_process": round(_requests(seen) / minutes * MINUTES_PER_MONTH * SQS_PRICE, 4)}
            b.say(f"sqs: idle: {receives:.2f} ReceiveMessage/min + {depth:.2f} GetQueueAttributes/min")

            b.openai.latency = 0.5
            b.say(f"sqs: trickle of {jobs} jobs, one every {gap:g} s")
            base = b.receiver.count()
            p0, m0, _ = _snap(proxy, d)
            for i in range(jobs):
                send_job(aws, f"trickle-{i}", key)
                b.receiver.wait_job(f"trickle-{i}", timeout=60)
                time.sleep(max(0.0, gap - 0.5))
            b.receiver.wait_count(base + jobs, timeout=60)
            b.receiver.check([f"trickle-{i}" for i in range(jobs)])
            _wait_completed(d, jobs)
            p1, m1, _ = _snap(proxy, d)
            trickle = _per_job(b, "trickle", _diff(p1, p0), _diff(m1, m0), jobs)
            trickle["config"] = {"gap_s": gap, "latency_s": 0.5, "CONCURRENCY": 4}
    finally:
        b.openai.latency = 0.0
        proxy.stop()
    return idle, trickle


def _wait_completed(d: DaemonProcess, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while d.completed() < n and time.monotonic() < deadline:
        time.sleep(0.1)


def backlog(b: Bench) -> dict[str, Any]:
    """A queue kept 30 jobs ahead of a CONCURRENCY=16 daemon; 3 s jobs, heartbeats every 2 s."""
    jobs = 48 if b.quick else 160
    aws = b.stack()
    key = b.tiny_key(aws)
    proxy = CountingProxy(b.moto.endpoint)
    b.openai.latency = 3.0
    try:
        with b.daemon(aws, endpoint=proxy.endpoint, CONCURRENCY=16, VISIBILITY_TIMEOUT=6) as d:
            b.say(f"sqs: backlog of {jobs} jobs, CONCURRENCY=16, 3 s per job, VISIBILITY_TIMEOUT=6")
            p0, m0, _ = _snap(proxy, d)
            beats0 = d.metrics().get(("sidecar_heartbeats_total", 'result="ok"'), 0.0)
            feeder = Feeder(aws, b.receiver, prefix="backlog", key=key, total=jobs, ahead=16 + 30).start()
            b.receiver.wait_count(feeder.base + jobs, timeout=600)
            b.receiver.check(feeder.ids())
            _wait_completed(d, jobs)
            p1, m1, _ = _snap(proxy, d)
            beats = d.metrics().get(("sidecar_heartbeats_total", 'result="ok"'), 0.0) - beats0
            row = _per_job(b, "backlog", _diff(p1, p0), _diff(m1, m0), d.completed())
    finally:
        b.openai.latency = 0.0
        proxy.stop()
    seen = _diff(p1, p0)
    row["config"] = {"CONCURRENCY": 16, "latency_s": 3.0, "VISIBILITY_TIMEOUT": 6, "heartbeat_every_s": 2,
                     "queue_kept_ahead": 30}
    row["heartbeat_extensions"] = int(beats)
    row["messages_per_receive"] = round(seen["sqs:ReceiveMessage:messages"] / max(1, seen["sqs:ReceiveMessage"]), 2)
    vis_requests = seen["sqs:ChangeMessageVisibility"] + seen["sqs:ChangeMessageVisibilityBatch"]
    row["visibility_changes_per_request"] = round(beats / vis_requests, 2) if vis_requests else None
    deletes = seen["sqs:DeleteMessage"] + seen["sqs:DeleteMessageBatch"]
    row["deletes_per_request"] = round(jobs / deletes, 2) if deletes else None
    return row


def run(b: Bench) -> dict[str, Any]:
    idle, trickle = idle_and_trickle(b)
    back = backlog(b)
    per_job = back["sqs_requests_per_job"]
    cost_ratio = TRANSCRIPTION_PER_JOB / max(back["sqs_cost_per_job_usd"], 1e-12)
    deletes_batched = (back["deletes_per_request"] or 0) > 1
    vis_batched = (back["visibility_changes_per_request"] or 0) > 1
    figures = [
        figure("idle ReceiveMessage per minute", idle["receive_per_min"], "req/min", target=f"<= {IDLE_TARGET}",
               met=idle["receive_per_min"] <= IDLE_TARGET, key="idle_receive_per_min"),
        figure("idle queue-depth polls (GetQueueAttributes) per minute", idle["depth_polls_per_min"], "req/min",
               key="idle_depth_per_min"),
        figure("idle SQS requests per minute, all", idle["total_per_min"], "req/min", target=f"<= {IDLE_TARGET}",
               met=idle["total_per_min"] <= IDLE_TARGET, key="idle_total_per_min"),
        figure("SQS requests per job, trickle", trickle["sqs_requests_per_job"], "req/job", key="trickle_per_job"),
        figure("SQS requests per job, backlog", per_job, "req/job", key="backlog_per_job"),
        figure("deletes per DeleteMessage* request, backlog", back["deletes_per_request"], "",
               target="> 1 (batched)", met=deletes_batched, key="deletes_per_request"),
        figure("visibility changes per ChangeMessageVisibility* request, backlog",
               back["visibility_changes_per_request"], "", target="> 1 (batched)", met=vis_batched,
               key="visibility_per_request"),
        figure("SQS cost per job (backlog)", back["sqs_cost_per_job_usd"], "$", key="sqs_cost_per_job"),
        figure("transcription cost per job (10 min at $0.006/min)", TRANSCRIPTION_PER_JOB, "$",
               key="transcription_cost_per_job"),
        figure("transcription cost / SQS cost", round(cost_ratio), "x", key="cost_ratio"),
        figure("idle SQS cost per process per month", idle["month_usd_per_process"], "$", key="idle_month_usd"),
    ]
    return {"title": "SQS requests", "headline": idle["receive_per_min"],
            "config": {"POLL_WAIT_SECONDS": 20, "QUEUE_METRICS_INTERVAL": 60, "audio": "1 s WAV",
                       "prices": {"sqs_per_request": SQS_PRICE, "s3_put": S3_PUT_PRICE, "s3_get": S3_GET_PRICE,
                                  "transcription_per_job": TRANSCRIPTION_PER_JOB}},
            "idle": idle, "trickle": trickle, "backlog": back, "figures": figures}
