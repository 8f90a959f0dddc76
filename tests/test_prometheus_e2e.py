"""A real Prometheus server scrapes a running daemon: the job counter reaches it through the side port, the
target is up, and monitoring/alerts.yml loads and evaluates cleanly on the server."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonProcess, free_port, send_job, upload
from tests.stack import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

ALERTS = Path(__file__).resolve().parent.parent / "monitoring" / "alerts.yml"
JOB = "salestrainer-sidecar"


@dataclass
class Prometheus:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def get(self, path: str, **params: str) -> dict[str, Any] | None:
        """The `data` of an API answer, or None while the server is not answering yet."""
        assert self.proc.poll() is None, f"prometheus exited early:\n{self.log_path.read_text()[-3000:]}"
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=5) as r:
                body = json.loads(r.read())
        except (OSError, ValueError):
            return None
        assert body["status"] == "success", body
        return dict(body["data"])

    def value(self, expr: str) -> float | None:
        """The single sample of an instant query, or None when it has none (yet)."""
        data = self.get("/api/v1/query", query=expr)
        if not data or not data["result"]:
            return None
        [sample] = data["result"]
        return float(sample["value"][1])


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[int], Prometheus]]:
    """Start `prometheus` scraping 127.0.0.1:<port> every second, with the alert rules; killed at teardown."""
    binary = shutil.which("prometheus")
    if binary is None:
        reason = "prometheus not installed (scripts/install-system-deps.sh installs the prometheus package)"
        print(reason)
        pytest.skip(reason)
    started: list[Prometheus] = []

    def start(target_port: int) -> Prometheus:
        config = tmp_path / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML; no quoting surprises
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{
                "job_name": JOB, "metrics_path": "/metrics",
                "static_configs": [{"targets": [f"127.0.0.1:{target_port}"], "labels": {"env": "test"}}],
            }],
        }))
        port = free_port()
        log_path = tmp_path / "prometheus.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        prom = Prometheus(proc, f"http://127.0.0.1:{port}", log_path)
        started.append(prom)
        return prom

    yield start
    for prom in started:
        if prom.proc.poll() is None:
            prom.proc.kill()
        prom.proc.wait(10)


def test_prometheus_scrapes_the_daemon_and_evaluates_the_alert_rules(
        spawn_daemon: Callable[..., DaemonProcess], prometheus: Callable[[int], Prometheus],
        aws: Any, wordpress: Any) -> None:
    daemon = spawn_daemon()
    daemon.wait_ready()
    prom = prometheus(daemon.metrics_port)

    wait_for(lambda: prom.value(f'up{{job="{JOB}"}}') == 1, timeout=30, interval=0.2, what="target up")
    upload(aws, "audio/prom.wav")
    send_job(aws, "job-prom", "audio/prom.wav")
    wait_for(lambda: wordpress.terminal("job-prom"), timeout=30, what="the callback")
    wait_for(lambda: prom.value('sidecar_jobs_total{outcome="completed"}') == 1, timeout=30, interval=0.2,
             what="the completed job in Prometheus")

    data = prom.get("/api/v1/query", query='sidecar_jobs_total{outcome="completed"}')
    assert data is not None
    [sample] = data["result"]
    assert sample["metric"]["job"] == JOB and sample["metric"]["env"] == "test"
    assert sample["metric"]["instance"] == f"127.0.0.1:{daemon.metrics_port}"
    assert prom.value(f'up{{job="{JOB}"}}') == 1

    def rules_evaluated() -> list[dict[str, Any]] | None:
        rules = prom.get("/api/v1/rules")
        groups = (rules or {}).get("groups", [])
        rules = [r for g in groups for r in g["rules"]]
        # A rule's health is "unknown" until the server has evaluated it once.
        return groups if rules and all(r["health"] != "unknown" for r in rules) else None

    groups = wait_for(rules_evaluated, timeout=30, interval=0.2, what="every rule evaluated")
    assert [g["name"] for g in groups] == ["salestrainer-sidecar"]
    assert all(g["file"] == str(ALERTS) for g in groups)
    rules = [r for g in groups for r in g["rules"]]
    assert {r["type"] for r in rules} == {"alerting"}
    bad = {r["name"]: (r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"}
    assert not bad, bad
    # Every rule of the file, loaded and evaluated by the real server.
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed")
    expected = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    assert {"SidecarDown", "SidecarNoSuccessfulPoll", "SidecarNoJobCompleted"} <= expected
    assert {r["name"] for r in rules} == expected
    # A healthy daemon that just polled and completed its one job fires nothing.
    firing = [r["name"] for r in rules if r["state"] == "firing"]
    assert not firing, firing
