"""monitoring/: the alert rules pass `promtool check rules` and their unit tests, the example Prometheus
config is valid, the Grafana dashboard parses and its queries are valid PromQL, and every metric the
dashboard and the alerts use is one the daemon exports."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.stack import require_tool

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
ALERTS = MONITORING / "alerts.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"

# The daemon's metrics (consumer/metrics.py); a histogram also exports _bucket, _sum and _count.
METRICS = frozenset(
    {
        "sidecar_jobs_total",
        "sidecar_errors_total",
        "sidecar_stage_duration_seconds",
        "sidecar_job_duration_seconds",
        "sidecar_jobs_in_progress",
        "sidecar_message_age_seconds",
        "sidecar_audio_seconds_total",
        "sidecar_sqs_requests_total",
        "sidecar_transcriptions_total",
        "sidecar_queue_messages",
        "sidecar_heartbeats_total",
        "sidecar_backpressure_seconds_total",
        "sidecar_rejected_total",
        "sidecar_last_poll_timestamp_seconds",
        "sidecar_build_info",
    }
)
HISTOGRAMS = frozenset(
    {"sidecar_stage_duration_seconds", "sidecar_job_duration_seconds", "sidecar_message_age_seconds"}
)
# Grafana's variables, replaced by something PromQL accepts so promtool can parse the queries.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m", "$cost_per_minute": "0.006"}


def _promtool() -> str:
    return require_tool("promtool", "scripts/install-system-deps.sh installs the prometheus package")


def _promtool_run(*args: str, cwd: Path = MONITORING) -> str:
    proc = subprocess.run([_promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    return output


def _dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def _dashboard_exprs() -> list[str]:
    exprs = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(_dashboard()["panels"])
    return exprs


def _alert_exprs() -> list[str]:
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed")
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def _metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\bsidecar_[a-z0-9_]+", expr))
    out = set()
    for name in names:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        out.add(base if base in HISTOGRAMS else name)
    return out


def test_rules_check() -> None:
    assert "SUCCESS" in _promtool_run("check", "rules", ALERTS.name)


def test_rules_unit_tests() -> None:
    assert "SUCCESS" in _promtool_run("test", "rules", "alerts_test.yml")


def test_prometheus_config_check() -> None:
    _promtool_run("check", "config", "prometheus.yml")


def test_every_alert_has_a_firing_test_and_the_suite_has_a_quiet_case() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed")
    rules = yaml.safe_load(ALERTS.read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    cases = [
        case
        for test in yaml.safe_load((MONITORING / "alerts_test.yml").read_text())["tests"]
        for case in test["alert_rule_test"]
    ]
    fired = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    assert alerts == fired, alerts ^ fired
    assert alerts == quiet, alerts ^ quiet
    for required in (
        "SidecarDown",
        "SidecarNoSuccessfulPoll",
        "SidecarDeadLetters",
        "SidecarJobFailureRatioHigh",
        "SidecarQueueBacklogGrowing",
        "SidecarJobsWaitTooLong",
        "SidecarOpenAIRateLimited",
        "SidecarNoJobCompleted",
    ):
        assert required in alerts


def test_alerts_use_only_exported_metrics() -> None:
    exprs = _alert_exprs()
    used = set().union(*map(_metric_names, exprs))
    assert used <= METRICS, used - METRICS
    assert any('up{job="salestrainer-sidecar"}' in e for e in exprs)


def test_dashboard_parses_and_uses_only_exported_metrics() -> None:
    exprs = _dashboard_exprs()
    assert len(exprs) >= 15
    used = set().union(*map(_metric_names, exprs))
    assert used <= METRICS, used - METRICS
    # What the dashboard is for: throughput/outcomes, latencies, in flight, queues, audio and cost.
    for metric in (
        "sidecar_jobs_total",
        "sidecar_stage_duration_seconds",
        "sidecar_jobs_in_progress",
        "sidecar_queue_messages",
        "sidecar_audio_seconds_total",
    ):
        assert metric in used, metric
    assert any("histogram_quantile(0.95" in e for e in exprs)
    assert any("histogram_quantile(0.5" in e for e in exprs)
    assert any('queue="dlq"' in e for e in exprs)
    assert any("$cost_per_minute" in e for e in exprs)


def test_dashboard_cost_variable_defaults_to_0_006() -> None:
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
    cost = variables["cost_per_minute"]
    assert cost["query"] == "0.006"
    assert cost["current"]["value"] == "0.006"
    assert {"datasource", "env", "model"} <= set(variables)


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each query, with Grafana's variables filled in, as a recording rule that promtool parses."""
    rules = []
    for i, expr in enumerate(_dashboard_exprs()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$__" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    assert "SUCCESS" in _promtool_run("check", "rules", str(path), cwd=tmp_path)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


# The runbook link of every alert: the external label runbook_base (when set), then the runbook's path.
RUNBOOK_URL = re.compile(
    r"^\{\{ with \$externalLabels\.runbook_base \}\}\{\{ \. \}\}/\{\{ end \}\}docs/operations\.md#(?P<anchor>[\w-]+)$"
)


def test_alert_runbook_links_point_at_runbook_sections() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed")
    runbook = MONITORING.parent / "docs" / "operations.md"
    anchors = {_anchor(m) for m in re.findall(r"^#+ (.+)$", runbook.read_text(), re.MULTILINE)}
    rules = yaml.safe_load(ALERTS.read_text())
    for rule in (r for group in rules["groups"] for r in group["rules"]):
        link = rule["annotations"]["runbook_url"]
        match = RUNBOOK_URL.match(link)
        assert match, f"{rule['alert']}: runbook_url is not built from $externalLabels.runbook_base: {link}"
        assert match["anchor"] in anchors, f"{rule['alert']}: no section #{match['anchor']} in docs/operations.md"


def test_prometheus_config_sets_an_absolute_runbook_base() -> None:
    """Alertmanager shows runbook_url as a link only when it is absolute; the base comes from here."""
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed")
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    base = config["global"]["external_labels"]["runbook_base"]
    assert re.fullmatch(r"https://[^\s/]+/\S+[^/]", base), base
    tests = yaml.safe_load((MONITORING / "alerts_test.yml").read_text())["tests"]
    # The promtool tests render the links with the same base (all but the one that shows the fallback).
    bases = [t["external_labels"]["runbook_base"] for t in tests if "external_labels" in t]
    assert bases and set(bases) == {base}, bases


def test_alerts_are_documented_in_the_runbook_table() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed")
    runbook = (MONITORING.parent / "docs" / "operations.md").read_text()
    rules = yaml.safe_load(ALERTS.read_text())
    for rule in (r for group in rules["groups"] for r in group["rules"]):
        assert f"| `{rule['alert']}` |" in runbook, f"{rule['alert']} is missing from the table in docs/operations.md"


def test_dashboard_shows_the_release_that_runs() -> None:
    """The deployed tag (sidecar_build_info's version label), with the package version beside it."""
    panels = [p for p in _dashboard()["panels"] if any("sidecar_build_info" in t.get("expr", "")
                                                       for t in p.get("targets", []))]
    [panel] = panels
    assert panel["type"] == "stat" and panel["options"]["textMode"] == "name"  # the legend is the text shown
    [target] = panel["targets"]
    assert "{{version}}" in target["legendFormat"] and "{{package_version}}" in target["legendFormat"]
