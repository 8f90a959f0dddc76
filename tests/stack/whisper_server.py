"""faster-whisper-server (third-party, from PyPI) as a subprocess: a real OpenAI-compatible transcription server.

It is someone else's implementation of `POST /v1/audio/transcriptions` (FastAPI, python-multipart, faster-whisper),
installed by scripts/install_thirdparty_server.py into a virtualenv of its own and serving the Whisper base model
`make model` fetched. What it accepts and how it answers is written down, with its source files, in
../shared/REALITY.md ("A third-party OpenAI-compatible server"); the points that shape this module:

- Started as `faster-whisper-server MODEL_DIR` (its README's "single model" mode), it serves every request with
  that model whatever the request's `model` says (`models.py`, `get_model_for_request`). Its multi-model mode
  would not select by `model` either: the endpoint reads a form field named `model_name` (`api.py`,
  `transcriptions`), so every OpenAI SDK request asks for its default, "whisper-1".
- A directory is loaded as it is, no hub involved (faster-whisper `transcribe.py`, `WhisperModel.__init__`
  calls `download_model` only for what is not a directory); HF_HUB_OFFLINE=1 makes any attempt fail at once.
- `/health` answers before the model is loaded: the model loads on the first transcription (`models.py`,
  `_load_model`), which therefore takes a second or two longer.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path
from types import ModuleType

from tests.stack import stop_process, wait_healthy

REPO = Path(__file__).resolve().parents[2]
INSTALLER = REPO / "scripts" / "install_thirdparty_server.py"
TRANSCRIPTIONS = "POST /v1/audio/transcriptions"


def _installer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("install_thirdparty_server", INSTALLER)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def installed_server() -> Path | None:
    """The server's command from the virtualenv of the current pins, or None when it is not installed."""
    installer = _installer()
    venv: Path = installer.venv_dir()
    return installer.server_command(venv) if installer.is_installed(venv) else None


class WhisperServer:
    """One faster-whisper-server process on 127.0.0.1:`port`, its output in `log_path`."""

    def __init__(self, command: Path, model_dir: Path, *, port: int, log_path: Path) -> None:
        self.command = command
        self.model_dir = model_dir
        self.port = port
        self.log_path = log_path
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, timeout: float = 60) -> WhisperServer:
        """Start the server and wait until /health answers; fail at once, with its output, if it exits."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["HF_HUB_OFFLINE"] = "1"
        argv = [str(self.command), str(self.model_dir), "--host", "127.0.0.1", "--port", str(self.port),
                "--log-level", "info"]  # info: its own lines saying which model it loaded
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_healthy(self.proc, self.port, self.log_path, timeout=timeout, what="faster-whisper-server")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def requests(self, line: str = TRANSCRIPTIONS) -> list[str]:
        """uvicorn's access-log lines that contain `line`, e.g. '"POST /v1/audio/transcriptions HTTP/1.1" 200'."""
        return [entry for entry in self.log().splitlines() if line in entry]

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
