"""Shared fixtures: a moto server per session, fresh queues per test, OpenAI and WordPress stand-ins,
settings pointing at them, and runners for the daemon in a thread or as a subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from consumer.app import Daemon, build_daemon
from consumer.settings import Settings, load_settings
from consumer.signing import sign
from tests.stack import wait_healthy
from tests.stack.aws import AwsStack, MotoServer
from tests.stack.openai_stub import OpenAIStub
from tests.stack.wordpress import WordPressStub

ROOT = Path(__file__).resolve().parent.parent
SPEECH = ROOT / "tests" / "fixtures" / "speech" / "sentence_en.wav"
SECRET = "test-signing-secret-0123456789"
TOKEN = "wp-server-token-abcdef"
OPENAI_KEY = "sk-test-openai-key-987654321"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def aws(moto_server: MotoServer) -> AwsStack:
    return AwsStack.create(moto_server)


@pytest.fixture
def openai_stub() -> Iterator[OpenAIStub]:
    stub = OpenAIStub().start()
    yield stub
    stub.stop()


@pytest.fixture
def wordpress() -> Iterator[WordPressStub]:
    stub = WordPressStub().start()
    yield stub
    stub.stop()


@pytest.fixture
def env(aws: AwsStack, openai_stub: OpenAIStub, wordpress: WordPressStub, tmp_path: Path) -> dict[str, str]:
    """Environment variables for a daemon wired to the local stack."""
    return stack_env(aws, openai_stub, wordpress, tmp_path)


def stack_env(aws: AwsStack, openai_stub: OpenAIStub, wordpress: WordPressStub, tmp_path: Path) -> dict[str, str]:
    """Environment variables for a daemon wired to these stand-ins."""
    return {
        **aws.env(),
        "OPENAI_API_KEY": OPENAI_KEY, "OPENAI_BASE_URL": openai_stub.base_url, "TRANSCRIBER": "openai",
        "OPENAI_MAX_RETRIES": "0", "TRANSCRIBE_TIMEOUT": "30",
        "SIDE_CAR_SECRET": SECRET, "WP_SIDE_CAR_CALLBACK": wordpress.url, "WP_SERVER_TOKEN": TOKEN,
        "POLL_WAIT_SECONDS": "1", "VISIBILITY_TIMEOUT": "30", "RETRY_BASE_DELAY": "1", "RETRY_MAX_DELAY": "2",
        "CALLBACK_TIMEOUT": "5", "SHUTDOWN_GRACE": "10", "METRICS_PORT": "0", "TEMP_DIR": str(tmp_path / "tmp"),
        "ENVIRONMENT": "test", "LOG_FORMAT": "json",
    }


@pytest.fixture
def make_settings(env: dict[str, str]) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {k.lower(): v for k, v in env.items()}
        values.update(overrides)
        return load_settings(env_file=None, **values)

    return build


def upload(aws: AwsStack, key: str, path: Path = SPEECH, *, data: bytes | None = None) -> str:
    aws.s3.put_object(Bucket=aws.bucket, Key=key, Body=data if data is not None else path.read_bytes())
    return key


def send_job(aws: AwsStack, job_id: str | None, key: str | None, *, secret: str | None = SECRET,
             body: str | None = None, extra: dict[str, Any] | None = None, signature: str | None = None) -> str:
    """Send a (signed) job message; `body` overrides the JSON built from job_id/key/extra."""
    if body is None:
        payload: dict[str, Any] = {"s3_key": key, **(extra or {})}
        if job_id is not None:
            payload["job_id"] = job_id
        body = json.dumps(payload)
    attrs: dict[str, Any] = {}
    sig = signature if signature is not None else (sign(body, [secret]) if secret else None)
    if sig:
        attrs["signature"] = {"DataType": "String", "StringValue": sig}
    return str(aws.sqs.send_message(QueueUrl=aws.queue_url, MessageBody=body, MessageAttributes=attrs)["MessageId"])


@dataclass
class RunningDaemon:
    daemon: Daemon
    thread: threading.Thread
    result: list[int] = field(default_factory=list)

    @property
    def worker(self) -> Any:
        return self.daemon.worker

    def stop(self, timeout: float = 30) -> int:
        self.daemon.worker.request_stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "daemon did not stop"
        return self.result[0]


@pytest.fixture
def run_daemon(make_settings: Callable[..., Settings], aws: AwsStack) -> Iterator[Callable[..., RunningDaemon]]:
    """Start the daemon in a thread of this process (with real clients); stopped at teardown."""
    running: list[RunningDaemon] = []

    def start(*, serve: bool = False, drain: bool = False, transcriber: Any = None,
              s3_hooks: Iterable[Callable[..., Any]] = (), **overrides: Any) -> RunningDaemon:
        """`s3_hooks`: botocore before-send handlers on the daemon's own S3 client, registered before it starts."""
        settings = make_settings(**overrides)
        from consumer.aws import make_clients

        sqs, s3 = make_clients(settings)
        for hook in s3_hooks:
            s3.meta.events.register("before-send.s3.*", hook)
        daemon = build_daemon(settings, sqs=sqs, s3=s3, transcriber=transcriber)
        if serve:
            daemon.serve(host="127.0.0.1", port=0)
        rd = RunningDaemon(daemon, threading.Thread(target=lambda: rd.result.append(daemon.run(drain=drain)),
                                                    daemon=True))
        rd.thread.start()
        running.append(rd)
        return rd

    yield start
    for rd in running:
        if rd.thread.is_alive():
            rd.stop()


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path
    metrics_port: int

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.logs() if r.get("event") == name]

    def wait_ready(self, timeout: float = 60) -> None:
        wait_healthy(self.proc, self.metrics_port, self.log_path, timeout=timeout)


@pytest.fixture
def spawn_daemon(env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start `python -m consumer run` as a subprocess; killed at teardown if still running."""
    procs: list[DaemonProcess] = []

    def spawn(extra: dict[str, str] | None = None, *, args: tuple[str, ...] = ("run",)) -> DaemonProcess:
        port = free_port()
        log_path = tmp_path / f"daemon-{len(procs)}.log"
        child_env = {**os.environ, **env, "METRICS_PORT": str(port), **(extra or {})}
        child_env.pop("NOTIFY_SOCKET", None)
        with log_path.open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "consumer", *args], cwd=tmp_path, env=child_env,
                                    stdout=log, stderr=subprocess.STDOUT)
        dp = DaemonProcess(proc, log_path, port)
        procs.append(dp)
        return dp

    yield spawn
    for dp in procs:
        if dp.proc.poll() is None:
            dp.proc.kill()
            dp.proc.wait(10)
