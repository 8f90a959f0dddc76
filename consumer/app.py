"""Wiring: builds the clients, the pipeline and the worker from Settings, and runs the daemon.

Everything is constructed here and handed down, so tests can hand in clients pointed at local servers.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import requests

from consumer.aws import make_heartbeat_client
from consumer.backpressure import RateGate
from consumer.deliver import Deliverer, make_session
from consumer.errors import ConfigError, ConsumerError
from consumer.metrics import Metrics, SidePortServer
from consumer.pipeline import Pipeline
from consumer.records import RecordStore
from consumer.sdnotify import Notifier
from consumer.settings import Settings
from consumer.sqs import SqsQueue, queue_url_for_arn
from consumer.transcribe import RequestSlots, SharedTranscriber, Transcriber, build_transcriber
from consumer.worker import Worker

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sqs import SQSClient

log = logging.getLogger("consumer.app")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def private_workdir(settings: Settings) -> Path:
    """A 0700 directory for this process's temp files; leftovers of dead processes are removed."""
    base = Path(settings.temp_dir or tempfile.gettempdir()) / "salestrainer-sidecar"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    base.chmod(0o700)
    for child in base.iterdir():
        if child.name.isdigit() and not _pid_alive(int(child.name)):
            shutil.rmtree(child, ignore_errors=True)
            log.info("temp_leftovers_removed", extra={"path": str(child)})
    mine = base / str(os.getpid())
    shutil.rmtree(mine, ignore_errors=True)  # a recycled pid's leftovers
    mine.mkdir(mode=0o700)
    return mine


def find_dlq(sqs: SQSClient, queue: SqsQueue, settings: Settings) -> tuple[str | None, int]:
    """(DLQ URL, attempts): SQS_DLQ_URL wins over the RedrivePolicy's DLQ; attempts are the policy's
    maxReceiveCount, or MAX_RECEIVES without a policy (else a job that keeps failing transiently would
    be retried until the queue's retention silently drops it)."""
    policy = queue.redrive_policy()
    max_receives = policy[1] if policy else settings.max_receives
    if settings.sqs_dlq_url:
        return settings.sqs_dlq_url, max_receives
    if policy:
        return queue_url_for_arn(sqs, policy[0]), max_receives
    return None, max_receives


def listen_problem(host: str, port: int, exc: OSError) -> str:
    """The configuration line for a side port that cannot be opened."""
    if exc.errno == errno.EADDRINUSE:
        return (f"METRICS_PORT: {host}:{port} is in use (another sidecar? prod listens on 9002); set "
                "METRICS_PORT to a free port, or 0 for any free port")
    if exc.errno == errno.EACCES:
        return f"METRICS_PORT: {port} needs privileges this user lacks; use a port above 1023"
    if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:  # no such name, or not ours
        return f"METRICS_HOST: cannot listen on {host!r} ({exc.strerror or exc}); 127.0.0.1 is the usual value"
    return f"METRICS_HOST/METRICS_PORT: cannot listen on {host}:{port}: {exc.strerror or exc}"


def ensure_can_listen(host: str, port: int) -> None:
    """Raise ConfigError now if METRICS_HOST:METRICS_PORT cannot be opened, before anything else starts.
    Binds the way the side port will (IPv4, SO_REUSEADDR, as http.server does) and closes again."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError([listen_problem(host, port, exc)]) from None


@dataclass
class Daemon:
    worker: Worker
    metrics: Metrics
    workdir: Path
    side_port: SidePortServer | None = None

    def serve(self, *, host: str, port: int) -> SidePortServer:
        """Start /metrics and /health; a port in use is a ConfigError naming METRICS_PORT."""
        try:
            self.side_port = SidePortServer(self.metrics, self.worker.health, host=host, port=port).start()
        except OSError as exc:
            raise ConfigError([listen_problem(host, port, exc)]) from None
        return self.side_port

    def run(self, *, drain: bool = False) -> int:
        try:
            return self.worker.run(drain=drain)
        finally:
            if self.side_port:
                self.side_port.stop()
            shutil.rmtree(self.workdir, ignore_errors=True)


def build_daemon(settings: Settings, *, sqs: SQSClient, s3: S3Client, transcriber: Transcriber | None = None,
                 session: requests.Session | None = None, stop: threading.Event | None = None,
                 notifier: Notifier | None = None, metrics: Metrics | None = None,
                 heartbeat_sqs: SQSClient | None = None) -> Daemon:
    """Assemble a ready-to-run daemon; raises ConfigError when the queue set-up is unusable."""
    problems = settings.run_problems()
    if problems:
        raise ConfigError(problems)
    metrics = metrics or Metrics()
    count = metrics.sqs_requests
    assert settings.sqs_queue_url and settings.s3_bucket and settings.wp_side_car_callback
    queue = SqsQueue(sqs, settings.sqs_queue_url, on_request=lambda op: count.labels(op).inc())
    try:
        dlq_url, max_receives = find_dlq(sqs, queue, settings)
    except ConsumerError as exc:
        raise ConfigError([f"SQS_QUEUE_URL: cannot read the queue: {exc.message}"]) from None
    if dlq_url is None:
        # Without one, a job that fails for good (and whose failure WordPress could not be told) would be
        # deleted with nothing left but a log line.
        raise ConfigError(["SQS_DLQ_URL: not set and the queue has no RedrivePolicy; the daemon needs a "
                           "dead-letter queue for jobs that fail for good"])
    dlq = SqsQueue(sqs, dlq_url, on_request=lambda op: count.labels(op).inc())
    stop = stop or threading.Event()
    gate = RateGate(stop, on_paused=metrics.backpressure_seconds.inc)
    pipeline = Pipeline(
        settings=settings, s3=s3,
        transcriber=SharedTranscriber(transcriber or build_transcriber(settings),
                                      RequestSlots(settings.transcribe_max_requests)),
        deliverer=Deliverer(session or make_session(), settings.wp_side_car_callback,
                            send_token_header=settings.send_x_server_token_header,
                            timeout=settings.callback_timeout),
        records=RecordStore(s3, settings.s3_bucket, settings.results_prefix),
        gate=gate, workdir=private_workdir(settings),
    )
    heartbeat_queue = SqsQueue(heartbeat_sqs or make_heartbeat_client(settings), settings.sqs_queue_url,
                               on_request=lambda op: count.labels(op).inc())
    worker = Worker(settings=settings, queue=queue, dlq=dlq, max_receive_count=max_receives, pipeline=pipeline,
                    metrics=metrics, notifier=notifier, stop=stop, heartbeat_queue=heartbeat_queue)
    return Daemon(worker=worker, metrics=metrics, workdir=pipeline.workdir)


def install_signal_handlers(worker: Worker) -> None:
    """First SIGTERM/SIGINT: graceful stop. Second: exit at once."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if worker.stop.is_set():
            log.warning("second_signal_exit_now", extra={"signal": signum})
            logging.shutdown()
            os._exit(128 + signum)
        log.info("signal_received", extra={"signal": signal.Signals(signum).name})
        worker.request_stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
