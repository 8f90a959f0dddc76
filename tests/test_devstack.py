"""`sidecar dev` (what `make run` runs) on a fresh checkout: embedded stack, local Whisper, a real transcript,
and a second shell that enqueues against the same stack with the environment file the console names."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.stack import wait_for

ROOT = Path(__file__).resolve().parent.parent
MODEL = Path(os.environ.get("WHISPER_MODEL", ROOT / ".cache" / "models" / "whisper-base"))
SPEECH = ROOT / "tests" / "fixtures" / "speech" / "sentence_en.wav"
SENTENCE = (ROOT / "tests" / "fixtures" / "speech" / "sentence_en.txt").read_text().strip()

pytestmark = [pytest.mark.asr, pytest.mark.e2e, pytest.mark.timeout(240)]


def words(text: str) -> list[str]:
    return "".join(c.lower() if c.isalnum() or c.isspace() else " " for c in text).split()


def test_make_run_without_configuration_shows_a_real_transcript(tmp_path):
    assert (MODEL / "model.bin").exists(), f"no model at {MODEL}: run `make model`"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "SQS_", "S3_", "OPENAI_", "WP_", "SIDE_CAR", "TRANSCRIBER", "NOTIFY_"))}
    env |= {"WHISPER_MODEL": str(MODEL), "METRICS_PORT": str(free_port()), "TEMP_DIR": str(tmp_path),
            "LOG_FORMAT": "json"}
    log_path = tmp_path / "dev.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "consumer", "dev"], cwd=tmp_path, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        def transcript(job_id: str) -> dict | None:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            for line in log_path.read_text(errors="replace").splitlines():
                if '"wordpress_received_callback"' in line and json.loads(line)["job_id"] == job_id:
                    return dict(json.loads(line))
            return None

        event = wait_for(lambda: transcript("sample-recording"), timeout=180, interval=0.2,
                         what="the sample's transcript in the console")
        assert event["status"] == "completed"
        heard, said = set(words(event["transcript"])), words(SENTENCE)
        assert sum(w in heard for w in said) >= 0.8 * len(said), event["transcript"]

        # A second shell, with nothing but the file the console names (a mistyped path is refused).
        second = tmp_path / ".cache" / "devstack.env"
        assert f"--env-file {second.relative_to(tmp_path)} enqueue" in log_path.read_text()
        assert stat.S_IMODE(second.stat().st_mode) == 0o600
        shell = {k: v for k, v in env.items() if k not in ("WHISPER_MODEL", "METRICS_PORT", "TEMP_DIR")}
        enqueue = [sys.executable, "-m", "consumer", "--env-file", ".cache/devstack.env", "enqueue"]
        typo = subprocess.run([*enqueue, "sentence_en.wa"], cwd=tmp_path, env=shell, capture_output=True, text=True,
                              timeout=60)
        assert typo.returncode == 1 and "no such local file" in typo.stderr
        sent = subprocess.run([*enqueue, str(SPEECH), "--job-id", "second-shell"], cwd=tmp_path, env=shell,
                              capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        event = wait_for(lambda: transcript("second-shell"), timeout=120, interval=0.2, what="the second job")
        assert event["status"] == "completed"  # signed with the stack's secret, verified by the daemon

        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(60) == 0
        assert not second.exists()  # the stack is gone: so is the way to it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
