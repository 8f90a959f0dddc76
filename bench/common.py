"""The run context every benchmark gets, the figure record, and small statistics helpers."""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.stack import CallbackReceiver, DaemonProcess, MotoProcess, daemon_env, write_wav
from tests.stack.aws import AwsStack
from tests.stack.openai_stub import OpenAIStub

TINY_SECONDS = 1.0  # "tiny audio": one second of 16 kHz mono WAV, 32 kB, sent to the API as it is


def figure(label: str, value: float | None, unit: str = "", *, target: str = "", met: bool | None = None,
           key: str = "") -> dict[str, Any]:
    """One reported number; `met` is None when there is no target to meet."""
    return {"key": key or label, "label": label, "value": value, "unit": unit, "target": target, "met": met}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


@dataclass
class Bench:
    """Shared servers and scratch space for one `python -m bench` run."""

    quick: bool
    tmp: Path
    moto: MotoProcess
    openai: OpenAIStub
    receiver: CallbackReceiver
    started: float = field(default_factory=time.monotonic)
    cache: dict[str, Any] = field(default_factory=dict)
    _daemons: int = 0

    @classmethod
    @contextmanager
    def open(cls, *, quick: bool) -> Iterator[Bench]:
        with tempfile.TemporaryDirectory(prefix="sidecar-bench-") as tmp:
            root = Path(tmp)
            moto = MotoProcess(root / "moto.log")
            openai = OpenAIStub().start()
            receiver = CallbackReceiver()
            try:
                yield cls(quick=quick, tmp=root, moto=moto, openai=openai, receiver=receiver)
            finally:
                receiver.stop()
                openai.stop()
                moto.stop()

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {message}", file=sys.stderr, flush=True)

    def stack(self) -> AwsStack:
        """A fresh queue, DLQ and bucket: moto's SQS slows down as a queue's history grows."""
        return AwsStack.create(self.moto)  # type: ignore[arg-type]  # MotoProcess quacks like MotoServer

    def tiny_key(self, aws: AwsStack) -> str:
        path = self.cache.get("tiny")
        if path is None:
            path = self.cache["tiny"] = write_wav(self.tmp / "tiny.wav", TINY_SECONDS)
        aws.s3.upload_file(str(path), aws.bucket, "audio/tiny.wav")
        return "audio/tiny.wav"

    @contextmanager
    def daemon(self, aws: AwsStack, *, endpoint: str | None = None, **settings: Any) -> Iterator[DaemonProcess]:
        """A fresh daemon subprocess on `aws`, ready (its /health answered 200); stopped on exit."""
        self._daemons += 1
        name = f"daemon-{self._daemons}"
        env = daemon_env(aws, openai_url=self.openai.base_url, callback_url=self.receiver.url,
                         tmp=self.tmp / name / "tmp", endpoint=endpoint, **settings)
        d = DaemonProcess(env, self.tmp / name, name)
        try:
            d.wait_ready()
            yield d
        finally:
            d.stop()
