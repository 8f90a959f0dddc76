"""`sidecar dev` (what `make run` runs) on a fresh checkout: embedded stack, local Whisper, a real transcript."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.stack import wait_for

ROOT = Path(__file__).resolve().parent.parent
MODEL = Path(os.environ.get("WHISPER_MODEL", ROOT / ".cache" / "models" / "whisper-base"))
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
        def transcript() -> dict | None:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            for line in log_path.read_text(errors="replace").splitlines():
                if '"wordpress_received_callback"' in line:
                    return dict(json.loads(line))
            return None

        event = wait_for(transcript, timeout=180, interval=0.2, what="the sample's transcript in the console")
        assert event["status"] == "completed" and event["job_id"] == "sample-recording"
        heard, said = set(words(event["transcript"])), words(SENTENCE)
        assert sum(w in heard for w in said) >= 0.8 * len(said), event["transcript"]
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
