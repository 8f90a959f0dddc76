"""Issue 15, item 1: the daemon against a peer, bbc/sqs-consumer, on the same stack in the same run.

The peer is `bench/peer/consumer.mjs`: sqs-consumer 15 (pinned with node 22 in bench/peer/package-lock.json,
installed into .cache/bench-peer/ by `npm ci` on first use) with a handler doing the daemon's happy path:
verify the signature, GET the recording from S3, POST it as multipart to the OpenAI stand-in, POST the
callback. Both consumers take 4 jobs at a time (CONCURRENCY=4 against batchSize=4) and get the same jobs
from the same moto server, OpenAI stand-in and callback receiver. Each phase runs the daemon, then the peer,
each in a fresh process on a fresh queue:

    single   jobs one at a time, 0.25 s transcriptions: overhead = callback - SendMessage - 0.25 s
    load     80 % of capacity (3.2 jobs/s, 1 s transcriptions): overhead p50, consumer CPU per job, peak RSS
    slow     1 job in 10 is slow (10 s of audio against 1 s; the stand-in takes 0.5 s per audio second):
             jobs/s with all of them queued at once (a batch that waits for its slowest job blocks the rest)
    faults   WordPress answers 503 to every job's first callback: transcriptions billed per job
    count    the consumer's AWS traffic through bench.stack.CountingProxy: S3 and SQS requests per job
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

from bench.common import TINY_SECONDS, Bench, figure, percentile
from bench.latency import _split, _stage_means
from bench.stack import (
    ROOT,
    SECRET,
    TOKEN,
    CountingProxy,
    DaemonProcess,
    daemon_env,
    job_entry,
    proc_cpu_seconds,
    proc_status_kb,
    send_job,
    write_wav,
)
from tests.stack import stop_process, wait_for
from tests.stack.aws import AwsStack

PEER_SOURCE = ROOT / "bench" / "peer"
PEER_HOME = ROOT / ".cache" / "bench-peer"
KINDS = ("ours", "peer")
BATCH = 4  # CONCURRENCY of the daemon, batchSize of sqs-consumer
SINGLE_LATENCY, LOAD_LATENCY, LOAD = 0.25, 1.0, 0.8
SLOW_EVERY, SLOW_AUDIO_S, PER_AUDIO_SECOND = 10, 10.0, 0.5
FAULT_LATENCY = 0.25
# Issue 15's item 2, on this benchmark's ratios (ours / peer).
P50_RATIO_TARGET, CPU_RATIO_TARGET, S3_CRITICAL_TARGET = 1.3, 1.5, 3


class Consumer(Protocol):
    @property
    def pid(self) -> int: ...


def install_peer(b: Bench) -> Path:
    """node and sqs-consumer as package-lock.json pins them, in .cache/bench-peer (npm ci when the lock changed)."""
    lock = (PEER_SOURCE / "package-lock.json").read_bytes()
    stamp = PEER_HOME / ".installed-lock.json"
    node = PEER_HOME / "node_modules" / ".bin" / "node"
    if not (node.exists() and stamp.exists() and stamp.read_bytes() == lock):
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm is missing: install Debian's npm (apt-get install npm) to run the peer")
        b.say("peer: npm ci of bench/peer/package-lock.json into .cache/bench-peer (once)")
        PEER_HOME.mkdir(parents=True, exist_ok=True)
        for name in ("package.json", "package-lock.json"):
            shutil.copy(PEER_SOURCE / name, PEER_HOME / name)
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=PEER_HOME, check=True)
        stamp.write_bytes(lock)
    # Imports resolve from the script's own directory, so the script runs beside its node_modules.
    shutil.copy(PEER_SOURCE / "consumer.mjs", PEER_HOME / "consumer.mjs")
    return node


class PeerProcess:
    """`node consumer.mjs` with the daemon's environment variable names; ready once it logs `started`."""

    def __init__(self, node: Path, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        child = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SQS_", "OPENAI_"))}
        child.update(env)
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen([str(node), "consumer.mjs"], cwd=PEER_HOME, env=child, stdout=log,
                                         stderr=subprocess.STDOUT)

        def started() -> bool:
            assert self.proc.poll() is None, f"the peer exited: {log_path.read_text()[-2000:]}"
            return '"event":"started"' in log_path.read_text()

        wait_for(started, timeout=30, interval=0.05, what="the peer consumer to start")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def errors(self) -> int:
        return self.log_path.read_text().count('"event":"processing_error"')

    def stop(self) -> None:
        stop_process(self.proc)


class FlakyWordPress:
    """A callback receiver that answers 503 to the first callback of every job, 200 to the rest."""

    def __init__(self) -> None:
        self.attempts: dict[str, int] = {}
        self.cond = threading.Condition()
        flaky = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with flaky.cond:
                    job = str(body["job_id"])
                    flaky.attempts[job] = flaky.attempts.get(job, 0) + 1
                    status = 503 if flaky.attempts[job] == 1 else 200
                    flaky.cond.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/wp-json/salestrainer/v1/upload-complete"
        threading.Thread(target=self.httpd.serve_forever, name="flaky-wordpress", daemon=True).start()

    def wait_delivered(self, jobs: list[str], timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: all(self.attempts.get(j, 0) >= 2 for j in jobs), timeout=timeout)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextmanager
def consumer(b: Bench, kind: str, aws: AwsStack, *, callback_url: str | None = None, endpoint: str | None = None,
             **settings: Any) -> Iterator[Consumer]:
    """A fresh daemon (`python -m consumer run`) or peer (`node consumer.mjs`) on `aws`, ready; stopped on exit."""
    b.cache["consumers"] = b.cache.get("consumers", 0) + 1
    name = f"{kind}-{b.cache['consumers']}"
    callback = callback_url or b.receiver.url
    env = daemon_env(aws, openai_url=b.openai.base_url, callback_url=callback, tmp=b.tmp / name / "tmp",
                     endpoint=endpoint, CONCURRENCY=BATCH, **settings)
    process: DaemonProcess | PeerProcess
    if kind == "ours":
        process = DaemonProcess(env, b.tmp / name, name)
        process.wait_ready()
    else:
        (b.tmp / name).mkdir(parents=True)
        peer_env = {**env, "BATCH_SIZE": str(BATCH), "RETRY_DELAY_SECONDS": env.get("RETRY_BASE_DELAY", "15"),
                    "SIDE_CAR_SECRET": SECRET, "WP_SERVER_TOKEN": TOKEN}
        process = PeerProcess(b.cache["node"], peer_env, b.tmp / name / "peer.log")
    try:
        yield process
    finally:
        process.stop()


def _wait_all(b: Bench, jobs: list[str], timeout: float) -> bool:
    with b.receiver.cond:
        return b.receiver.cond.wait_for(lambda: all(j in b.receiver.arrived for j in jobs), timeout=timeout)


def _overheads(b: Bench, sent: dict[str, float], latency: float) -> list[float]:
    b.receiver.check(list(sent))
    return [(b.receiver.arrived[j] - t - latency) * 1000 for j, t in sent.items()]


def single(b: Bench, kind: str, jobs: int) -> dict[str, Any]:
    aws = b.stack()
    key = b.tiny_key(aws)
    b.openai.latency = SINGLE_LATENCY
    sent: dict[str, float] = {}
    where: dict[str, Any] = {}
    with consumer(b, kind, aws) as c:
        time.sleep(1.0)  # the first long poll is open
        for i in range(jobs):
            job = f"{kind}-single-{i}"
            sent[job] = time.monotonic()
            send_job(aws, job, key)
            if b.receiver.wait_job(job, timeout=60) is None:
                raise RuntimeError(f"{kind}: no callback for {job} within 60 s")
            time.sleep(0.05)  # the delete lands: one job in the system at a time
        if isinstance(c, DaemonProcess):  # where the daemon's time goes: its stage histograms, its callbacks
            where = {"stage_means_ms": _stage_means(c.metrics())} | _split(b, sent, SINGLE_LATENCY)
    ms = _overheads(b, sent, SINGLE_LATENCY)
    return {"jobs": jobs, "p50_ms": round(percentile(ms, 50), 1), "p99_ms": round(percentile(ms, 99), 1),
            **where, "samples_ms": [round(x, 1) for x in ms]}


def load(b: Bench, kind: str, seconds: float) -> dict[str, Any]:
    aws = b.stack()
    key = b.tiny_key(aws)
    b.openai.latency = LOAD_LATENCY
    rate = LOAD * BATCH / LOAD_LATENCY
    jobs = int(rate * seconds)
    sent: dict[str, float] = {}
    with consumer(b, kind, aws) as c:
        time.sleep(1.0)
        cpu0, moto0 = proc_cpu_seconds(c.pid), proc_cpu_seconds(b.moto.pid)
        start = time.monotonic()
        for i in range(jobs):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sent[f"{kind}-load-{i}"] = time.monotonic()
            send_job(aws, f"{kind}-load-{i}", key)
        if not _wait_all(b, list(sent), timeout=120):
            raise RuntimeError(f"{kind}: not every job of the load phase was called back within 120 s")
        cpu, moto = proc_cpu_seconds(c.pid) - cpu0, proc_cpu_seconds(b.moto.pid) - moto0
        rss = proc_status_kb(c.pid, "VmHWM") / 1024
    ms = _overheads(b, sent, LOAD_LATENCY)
    done = sorted(b.receiver.arrived[j] for j in sent)
    return {"jobs": jobs, "offered_per_s": rate, "completed_per_s": round((len(done) - 1) / (done[-1] - done[0]), 2),
            "p50_ms": round(percentile(ms, 50), 1), "p99_ms": round(percentile(ms, 99), 1),
            "cpu_ms_per_job": round(cpu / jobs * 1000, 2), "moto_cpu_ms_per_job": round(moto / jobs * 1000, 2),
            "peak_rss_mb": round(rss, 1), "samples_ms": [round(x, 1) for x in ms]}


def slow(b: Bench, kind: str, jobs: int) -> dict[str, Any]:
    aws = b.stack()
    fast_key = b.tiny_key(aws)
    path = b.cache.get("slow_wav") or write_wav(b.tmp / "slow.wav", SLOW_AUDIO_S)
    b.cache["slow_wav"] = path
    aws.s3.upload_file(str(path), aws.bucket, "audio/slow.wav")
    b.openai.latency, b.openai.latency_per_audio_second = 0.0, PER_AUDIO_SECOND
    ids = [f"{kind}-slow-{i}" for i in range(jobs)]
    try:
        with consumer(b, kind, aws):
            time.sleep(1.0)
            first = time.monotonic()
            for start in range(0, jobs, 10):
                entries = [job_entry(i - start, ids[i], "audio/slow.wav" if i % SLOW_EVERY == 0 else fast_key)
                           for i in range(start, min(jobs, start + 10))]
                aws.sqs.send_message_batch(QueueUrl=aws.queue_url, Entries=entries)
            if not _wait_all(b, ids, timeout=300):
                raise RuntimeError(f"{kind}: not every job of the slow phase was called back within 300 s")
    finally:
        b.openai.latency_per_audio_second = 0.0
    b.receiver.check(ids)
    elapsed = max(b.receiver.arrived[j] for j in ids) - first
    work = (jobs // SLOW_EVERY) * SLOW_AUDIO_S + (jobs - jobs // SLOW_EVERY) * TINY_SECONDS
    ideal = jobs / (work * PER_AUDIO_SECOND / BATCH)
    return {"jobs": jobs, "elapsed_s": round(elapsed, 2), "jobs_per_s": round(jobs / elapsed, 2),
            "ideal_jobs_per_s": round(ideal, 2)}


def faults(b: Bench, kind: str, jobs: int) -> dict[str, Any]:
    aws = b.stack()
    key = b.tiny_key(aws)
    b.openai.latency = FAULT_LATENCY
    flaky = FlakyWordPress()
    ids = [f"{kind}-fault-{i}" for i in range(jobs)]
    try:
        with consumer(b, kind, aws, callback_url=flaky.url, RETRY_BASE_DELAY=1):
            time.sleep(1.0)
            before = b.openai.count()
            for start in range(0, jobs, 10):
                entries = [job_entry(i - start, ids[i], key) for i in range(start, min(jobs, start + 10))]
                aws.sqs.send_message_batch(QueueUrl=aws.queue_url, Entries=entries)
            if not flaky.wait_delivered(ids, timeout=180):
                raise RuntimeError(f"{kind}: not every job's callback got through within 180 s")
            wait_for(lambda: aws.counts() == (0, 0), timeout=60, interval=0.2, what="the queue to drain")
            billed = b.openai.count() - before
    finally:
        flaky.stop()
    return {"jobs": jobs, "transcriptions": billed, "billed_per_job": round(billed / jobs, 2),
            "callbacks_per_job": round(sum(flaky.attempts.values()) / jobs, 2)}


class TimedProxy(CountingProxy):
    """CountingProxy that also keeps when each request was answered, to tell requests before a callback."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.log: list[tuple[float, str]] = []

    def record(self, op: str, request: bytes, response: bytes) -> None:
        super().record(op, request, response)
        with self.lock:
            self.log.append((time.monotonic(), op))


def count(b: Bench, kind: str, jobs: int) -> dict[str, Any]:
    """Jobs one at a time through the proxy: every request of a job falls between its send and the next one's."""
    aws = b.stack()
    key = b.tiny_key(aws)
    b.openai.latency = 0.1
    proxy = TimedProxy(b.moto.endpoint)
    windows = []
    try:
        with consumer(b, kind, aws, endpoint=proxy.endpoint):
            time.sleep(1.0)
            for i in range(jobs):
                job = f"{kind}-count-{i}"
                sent = time.monotonic()
                send_job(aws, job, key)
                arrived = b.receiver.wait_job(job, timeout=60)
                if arrived is None:
                    raise RuntimeError(f"{kind}: no callback for {job} within 60 s")
                wait_for(lambda: aws.counts() == (0, 0), timeout=30, interval=0.05, what="the delete")
                time.sleep(0.1)  # what follows the delete (a record's last write) lands in this job's window
                windows.append((sent, arrived, time.monotonic()))
            log = list(proxy.log)
    finally:
        proxy.stop()
    b.receiver.check([f"{kind}-count-{i}" for i in range(jobs)])
    s3 = [(t, op) for t, op in log if op.startswith("s3:")]
    in_jobs = [(t, op) for t, op in s3 if any(a <= t <= c for a, _, c in windows)]
    critical = [(t, op) for t, op in s3 if any(a <= t <= cb for a, cb, _ in windows)]
    by_method: dict[str, float] = {}
    for _, op in in_jobs:
        by_method[op] = by_method.get(op, 0) + 1 / jobs
    sqs = proxy.snapshot()
    return {"jobs": jobs, "s3_per_job": round(len(in_jobs) / jobs, 2),
            "s3_before_callback_per_job": round(len(critical) / jobs, 2),
            "s3_by_method_per_job": {k: round(v, 2) for k, v in sorted(by_method.items())},
            "sqs_by_operation": {k: v for k, v in sorted(sqs.items()) if k.startswith("sqs:")}}


def _ratio(ours: float, peer: float) -> float | None:
    return round(ours / peer, 2) if peer else None


def run(b: Bench) -> dict[str, Any]:
    b.cache["node"] = install_peer(b)
    sizes = {"single": 30, "load_s": 15.0, "slow": 30, "faults": 10, "count": 10} if b.quick else \
        {"single": 60, "load_s": 30.0, "slow": 40, "faults": 20, "count": 10}
    phases = (("single", lambda k: single(b, k, sizes["single"])), ("load", lambda k: load(b, k, sizes["load_s"])),
              ("slow", lambda k: slow(b, k, sizes["slow"])), ("faults", lambda k: faults(b, k, sizes["faults"])),
              ("count", lambda k: count(b, k, sizes["count"])))
    out: dict[str, dict[str, Any]] = {k: {} for k in KINDS}
    try:
        for phase, fn in phases:
            for kind in KINDS:  # phase by phase, so a change in the machine's load hits both alike
                out[kind][phase] = fn(kind)
                shown = {k: v for k, v in out[kind][phase].items() if not isinstance(v, (list, dict))}
                b.say(f"peer: {phase}: {kind}: {shown}")
    finally:
        b.openai.latency, b.openai.latency_per_audio_second = 0.0, 0.0
    ours, peer = out["ours"], out["peer"]
    rows = [  # (label, key, ours, peer, unit, target on the ratio or on ours, met)
        ("overhead one at a time, p50", "single_p50", ours["single"]["p50_ms"], peer["single"]["p50_ms"], "ms"),
        ("overhead one at a time, p99", "single_p99", ours["single"]["p99_ms"], peer["single"]["p99_ms"], "ms"),
        ("overhead at 80 % load, p50", "load_p50", ours["load"]["p50_ms"], peer["load"]["p50_ms"], "ms"),
        ("throughput, 1 job in 10 slow", "slow_jobs_per_s", ours["slow"]["jobs_per_s"], peer["slow"]["jobs_per_s"],
         "jobs/s"),
        ("transcriptions billed per job under faults", "billed_per_job", ours["faults"]["billed_per_job"],
         peer["faults"]["billed_per_job"], ""),
        ("S3 requests per job", "s3_per_job", ours["count"]["s3_per_job"], peer["count"]["s3_per_job"], ""),
        ("S3 requests per job before the callback", "s3_critical", ours["count"]["s3_before_callback_per_job"],
         peer["count"]["s3_before_callback_per_job"], ""),
        ("consumer CPU per job under load", "cpu_ms_per_job", ours["load"]["cpu_ms_per_job"],
         peer["load"]["cpu_ms_per_job"], "ms"),
        ("peak RSS", "peak_rss_mb", ours["load"]["peak_rss_mb"], peer["load"]["peak_rss_mb"], "MB"),
    ]
    table = [{"label": label, "key": key, "ours": o, "peer": p, "unit": unit, "ratio": _ratio(o, p)}
             for label, key, o, p, unit in rows]
    ratio = {r["key"]: r["ratio"] for r in table}
    figures = []
    for r in table:
        target, met = "", None
        if r["key"] == "single_p50":
            target, met = f"ratio <= {P50_RATIO_TARGET}", r["ratio"] is not None and r["ratio"] <= P50_RATIO_TARGET
        elif r["key"] == "cpu_ms_per_job":
            target, met = f"ratio <= {CPU_RATIO_TARGET}", r["ratio"] is not None and r["ratio"] <= CPU_RATIO_TARGET
        elif r["key"] == "slow_jobs_per_s":
            target, met = "ratio >= 1 (kept)", r["ratio"] is not None and r["ratio"] >= 1.0
        elif r["key"] == "billed_per_job":
            target, met = "ratio <= 1 (kept)", r["ratio"] is not None and r["ratio"] <= 1.0
        unit = f" {r['unit']}" if r["unit"] else ""
        figures.append(figure(f"{r['label']}: ours / peer ({r['ours']} / {r['peer']}{unit})", r["ratio"], "x",
                              target=target, met=met, key=r["key"]))
    critical = ours["count"]["s3_before_callback_per_job"]
    figures.append(figure("ours: S3 requests per job before the callback", critical, "",
                          target=f"<= {S3_CRITICAL_TARGET}", met=critical <= S3_CRITICAL_TARGET,
                          key="s3_critical_ours"))
    return {"title": "Against bbc/sqs-consumer", "headline": ratio["single_p50"],
            "config": {"peer": "sqs-consumer 15.0.3 on node 22.23.3 (bench/peer/package-lock.json)",
                       "batch": BATCH, "single_latency_s": SINGLE_LATENCY, "load_latency_s": LOAD_LATENCY,
                       "load": LOAD, "slow": f"1 in {SLOW_EVERY} jobs {SLOW_AUDIO_S:g} s of audio, else "
                       f"{TINY_SECONDS:g} s; {PER_AUDIO_SECOND} s per audio second", "faults":
                       "WordPress answers 503 to each job's first callback; retry after 1 s on both sides",
                       **sizes},
            "table": table, "ours": ours, "peer": peer, "figures": figures}
