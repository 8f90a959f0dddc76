"""What every benchmark stands on: moto in its own process, the stand-ins, the daemon as a subprocess.

    MotoProcess       `python -m moto.server` on a free loopback port (its own CPU, not this process's GIL)
    CallbackReceiver  a WordPress stand-in that stamps each callback's arrival with time.monotonic()
    CountingProxy     an HTTP proxy in front of moto counting SQS requests by operation (and S3 by method)
    DaemonProcess     `python -m consumer run` with env vars; /proc CPU and VmHWM, /metrics scrape
    Feeder            sends signed jobs in batches of ten, keeping the queue shallow

The OpenAI stand-in is `tests.stack.openai_stub.OpenAIStub` and queues come from `tests.stack.aws.AwsStack`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import wave
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import numpy as np

from consumer.signing import sign
from tests.stack import stop_process, wait_for, wait_healthy
from tests.stack.aws import REGION, AwsStack

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-signing-secret-0123456789"
TOKEN = "bench-wp-server-token"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------- moto


class MotoProcess:
    """moto in server mode as a child process; quacks like tests.stack.aws.MotoServer for AwsStack."""

    def __init__(self, log_path: Path) -> None:
        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=log_path.parent)

        def up() -> bool:
            assert self.proc.poll() is None, f"moto exited: {log_path.read_text()[-2000:]}"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return True
            except OSError:
                return False

        wait_for(up, timeout=30, interval=0.1, what="moto server")

    def session(self) -> boto3.session.Session:
        return boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                                     region_name=REGION)

    def client(self, service: str) -> Any:
        return self.session().client(service, endpoint_url=self.endpoint)  # type: ignore[call-overload]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


# ------------------------------------------------------------------------------------- callbacks


class CallbackReceiver:
    """Answers every callback 200 and records (job_id -> arrival time, status)."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.status: dict[str, str] = {}
        self.timings: dict[str, dict[str, int]] = {}  # the callback's own timings (download/transcribe/total ms)
        self.cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                now = time.monotonic()
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw)
                with receiver.cond:
                    receiver.arrived.setdefault(str(body["job_id"]), now)
                    receiver.status.setdefault(str(body["job_id"]), str(body.get("status")))
                    receiver.timings.setdefault(str(body["job_id"]), dict(body.get("timings") or {}))
                    receiver.cond.notify_all()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "11")
                self.end_headers()
                self.wfile.write(b'{"ok":true}')

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/wp-json/salestrainer/v1/upload-complete"
        threading.Thread(target=self.httpd.serve_forever, name="callback-receiver", daemon=True).start()

    def count(self) -> int:
        with self.cond:
            return len(self.arrived)

    def wait_count(self, n: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.arrived) >= n, timeout=timeout)

    def wait_job(self, job_id: str, timeout: float) -> float | None:
        with self.cond:
            self.cond.wait_for(lambda: job_id in self.arrived, timeout=timeout)
            return self.arrived.get(job_id)

    def check(self, job_ids: list[str]) -> None:
        """Raise unless every job was called back as completed: a figure over failed jobs is no figure."""
        with self.cond:
            bad = {j: self.status.get(j, "no callback") for j in job_ids if self.status.get(j) != "completed"}
        if bad:
            sample = dict(list(bad.items())[:3])
            raise RuntimeError(f"{len(bad)} of {len(job_ids)} jobs did not complete, e.g. {sample}")

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ----------------------------------------------------------------------------------------- proxy

HOP_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade", "te"})


class ProxyHandler(BaseHTTPRequestHandler):
    """One client connection of the counting proxy, with its own keep-alive connection to moto."""

    protocol_version = "HTTP/1.1"
    proxy: CountingProxy
    upstream: http.client.HTTPConnection | None = None

    def _forward(self) -> None:
        body = self._read_body()
        op = self.proxy.classify(self.command, dict(self.headers.items()), body)
        if self.upstream is None:
            self.upstream = http.client.HTTPConnection(self.proxy.host, self.proxy.port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS | {"expect"}}
        headers["Content-Length"] = str(len(body))
        self.upstream.request(self.command, self.path, body=body, headers=headers)
        resp = self.upstream.getresponse()
        data = resp.read()
        self.proxy.record(op, body, data)
        head = self.command == "HEAD"  # no body, but the Content-Length of the object: pass it on as it is
        try:
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in HOP_HEADERS | ({"content-length"} if not head else set()):
                    self.send_header(k, v)
            if not head:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the daemon stopped while its long poll was open

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_GET(self) -> None:
        self._forward()

    def do_POST(self) -> None:
        self._forward()

    def do_PUT(self) -> None:
        self._forward()

    def do_HEAD(self) -> None:
        self._forward()

    def do_DELETE(self) -> None:
        self._forward()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class CountingProxy:
    """Forwards everything to moto; counts SQS requests by operation, batch entries, and S3 by method.

    SQS speaks JSON (`X-Amz-Target: AmazonSQS.<Operation>`) in current botocore, the query protocol
    (`Action=<Operation>`) in older ones; both are recognised. Empty ReceiveMessage answers are counted
    separately as `ReceiveMessage(empty)` on top of `ReceiveMessage`.
    """

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        handler = type("Handler", (ProxyHandler,), {"proxy": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, name="counting-proxy", daemon=True).start()

    @staticmethod
    def classify(method: str, headers: dict[str, str], body: bytes) -> str:
        target = next((v for k, v in headers.items() if k.lower() == "x-amz-target"), "")
        if target.startswith("AmazonSQS."):
            return "sqs:" + target.split(".", 1)[1]
        match = re.search(rb"(?:^|&)Action=([A-Za-z]+)", body)
        if match:
            return "sqs:" + match.group(1).decode()
        return f"s3:{method}"

    def record(self, op: str, request: bytes, response: bytes) -> None:
        extra: list[tuple[str, int]] = []
        if op.endswith("Batch"):
            with contextlib.suppress(ValueError):
                extra.append((op + ":entries", len(json.loads(request).get("Entries", []))))
        if op == "sqs:ReceiveMessage":
            try:
                messages = len(json.loads(response or b"{}").get("Messages", []))
            except ValueError:
                messages = 0
            extra.append(("sqs:ReceiveMessage:messages", messages))
            if messages == 0:
                extra.append(("sqs:ReceiveMessage(empty)", 1))
        with self.lock:
            self.counts[op] += 1
            for key, n in extra:
                self.counts[key] += n

    def snapshot(self) -> Counter[str]:
        with self.lock:
            return Counter(self.counts)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------------------------------- daemon

METRIC_LINE = re.compile(r'^(sidecar_[a-z_]+)(?:\{([^}]*)\})? ([0-9.eE+-]+|NaN)$')


class DaemonProcess:
    """`python -m consumer run` as a child process, as systemd would run it."""

    def __init__(self, env: dict[str, str], workdir: Path, name: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = workdir / f"{name}.log"
        child_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SQS_", "OPENAI_"))}
        child_env.pop("NOTIFY_SOCKET", None)
        child_env.update(env)
        child_env.update(METRICS_HOST="127.0.0.1", METRICS_PORT=str(self.port),
                         PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        with self.log_path.open("wb") as log:  # cwd = workdir: a .env in the repo must not leak in
            self.proc = subprocess.Popen([sys.executable, "-m", "consumer", "run"], cwd=workdir, env=child_env,
                                         stdout=log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 60) -> None:
        wait_healthy(self.proc, self.port, self.log_path, timeout=timeout)

    def cpu_seconds(self) -> float:
        """user + sys CPU seconds of the daemon so far, from /proc/<pid>/stat (clock-tick resolution)."""
        return proc_cpu_seconds(self.pid)

    def vm_hwm_mb(self) -> float:
        return proc_status_kb(self.pid, "VmHWM") / 1024

    def vm_rss_mb(self) -> float:
        return proc_status_kb(self.pid, "VmRSS") / 1024

    def metrics(self) -> dict[tuple[str, str], float]:
        """{(metric name, label string): value} of every sidecar_* sample on /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out: dict[tuple[str, str], float] = {}
        for line in text.splitlines():
            m = METRIC_LINE.match(line)
            if m:
                out[(m.group(1), m.group(2) or "")] = float(m.group(3))
        return out

    def sqs_requests(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for (name, labels), value in self.metrics().items():
            if name == "sidecar_sqs_requests_total":
                out["sqs:" + labels.split('"')[1]] = int(value)
        return out

    def completed(self) -> int:
        return int(self.metrics().get(("sidecar_jobs_total", 'outcome="completed"'), 0))

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == name:
                out.append(record)
        return out

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime: fields 14 and 15 of stat(5)


def proc_status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def daemon_env(aws: AwsStack, *, openai_url: str, callback_url: str, tmp: Path, endpoint: str | None = None,
               **settings: Any) -> dict[str, str]:
    """Environment of a daemon wired to the local stack; `settings` are extra VARIABLE=value pairs."""
    env = {
        **aws.env(),
        "OPENAI_API_KEY": "sk-bench-not-a-key", "OPENAI_BASE_URL": openai_url, "TRANSCRIBER": "openai",
        "OPENAI_MAX_RETRIES": "0", "TRANSCRIBE_TIMEOUT": "120",
        "SIDE_CAR_SECRET": SECRET, "WP_SIDE_CAR_CALLBACK": callback_url, "WP_SERVER_TOKEN": TOKEN,
        "POLL_WAIT_SECONDS": "20", "VISIBILITY_TIMEOUT": "120", "CALLBACK_TIMEOUT": "30",
        "SHUTDOWN_GRACE": "10", "TEMP_DIR": str(tmp), "ENVIRONMENT": "test", "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
    }
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
    env.update({k: str(v) for k, v in settings.items()})
    return env


# ------------------------------------------------------------------------------------------ jobs


def job_entry(i: int, job_id: str, key: str) -> dict[str, Any]:
    body = json.dumps({"job_id": job_id, "s3_key": key})
    return {"Id": str(i), "MessageBody": body,
            "MessageAttributes": {"signature": {"DataType": "String", "StringValue": sign(body, [SECRET])}}}


def send_job(aws: AwsStack, job_id: str, key: str) -> None:
    entry = job_entry(0, job_id, key)
    aws.sqs.send_message(QueueUrl=aws.queue_url, MessageBody=entry["MessageBody"],
                         MessageAttributes=entry["MessageAttributes"])


class Feeder:
    """Sends `total` jobs in batches of ten, never more than `ahead` beyond what has been called back."""

    def __init__(self, aws: AwsStack, receiver: CallbackReceiver, *, prefix: str, key: str, total: int,
                 ahead: int) -> None:
        self.aws, self.receiver, self.prefix, self.key = aws, receiver, prefix, key
        self.total, self.ahead = total, ahead
        self.sent = 0
        self.base = receiver.count()
        self.first_sent: float | None = None
        self.thread = threading.Thread(target=self._run, name="feeder", daemon=True)

    def ids(self) -> list[str]:
        return [f"{self.prefix}-{i}" for i in range(self.total)]

    def start(self) -> Feeder:
        self.thread.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + 1800
        while self.sent < self.total and time.monotonic() < deadline:
            done = self.receiver.count() - self.base
            room = min(10, self.total - self.sent, self.ahead - (self.sent - done))
            if room <= 0:
                with self.receiver.cond:
                    self.receiver.cond.wait(0.2)
                continue
            entries = [job_entry(j, f"{self.prefix}-{self.sent + j}", self.key) for j in range(room)]
            if self.first_sent is None:
                self.first_sent = time.monotonic()
            self.aws.sqs.send_message_batch(QueueUrl=self.aws.queue_url, Entries=entries)
            self.sent += room


# ----------------------------------------------------------------------------------------- audio


def write_wav(path: Path, seconds: float, *, rate: int = 16_000, channels: int = 1,
              on_progress: Callable[[float], None] | None = None) -> Path:
    """Speech-like talk turns over room noise as 16-bit PCM WAV, streamed ten seconds at a time."""
    rng = np.random.default_rng(1)
    block = 10 * rate
    total = int(seconds * rate)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        for start in range(0, total, block):
            n = min(block, total - start)
            t = (start + np.arange(n)) / rate
            talking = (t % 9.0) < 7.5  # 7.5 s turns, 1.5 s pauses: the splitter finds cuts as in a call
            voice = 0.15 * (0.6 + 0.4 * np.abs(np.sin(2 * np.pi * 2.5 * t))) * np.sin(2 * np.pi * 140 * t)
            mono = rng.standard_normal(n) * 0.001 + np.where(talking, voice, 0.0)
            pcm = (mono * 32767).astype("<i2")
            out.writeframes(np.repeat(pcm, channels).tobytes() if channels > 1 else pcm.tobytes())
            if on_progress and start // block % 60 == 0:
                on_progress(start / total)
    return path


def wav_seconds_for(megabytes: float, *, rate: int, channels: int) -> float:
    return megabytes * 1_000_000 / (rate * channels * 2)
