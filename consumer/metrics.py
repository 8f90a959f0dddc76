"""Prometheus metrics (defined here and nowhere else) and the side-port server for /metrics and /health.

The worker observes; pipeline stages never import this module. Each `Metrics` owns its registry so
several daemons can live in one test process.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from consumer import __version__
from consumer.release import running_release

# Transcriptions take seconds to minutes; SQS and S3 calls milliseconds.
STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
JOB_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600)
AGE_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)

OUTCOMES = ("completed", "retried", "failed", "dead_lettered", "duplicate")


class Metrics:
    """Every sidecar_* metric, registered on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None, *, release: str | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.build_info = Info(
            "sidecar_build", "The running daemon: version (the deployed tag) and package_version.", registry=r
        )
        self.build_info.info({"version": release or running_release(), "package_version": __version__})
        self.jobs = Counter("sidecar_jobs", "Jobs by final outcome of an attempt.", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.jobs.labels(outcome)
        self.errors = Counter("sidecar_errors", "Failures by stage and error code.", ["stage", "code"], registry=r)
        self.rejected = Counter("sidecar_rejected", "Messages rejected as invalid.", ["reason"], registry=r)
        self.stage_duration = Histogram(
            "sidecar_stage_duration_seconds", "Time per pipeline stage.", ["stage"],
            buckets=STAGE_BUCKETS, registry=r,
        )
        self.job_duration = Histogram(
            "sidecar_job_duration_seconds", "Receive to settle, per job.", buckets=JOB_BUCKETS, registry=r
        )
        self.in_progress = Gauge("sidecar_jobs_in_progress", "Jobs being processed now.", registry=r)
        self.message_age = Histogram(
            "sidecar_message_age_seconds", "SentTimestamp to receive.", buckets=AGE_BUCKETS, registry=r
        )
        self.audio_seconds = Counter(
            "sidecar_audio_seconds", "Seconds of audio transcribed.", ["model"], registry=r
        )
        self.sqs_requests = Counter(
            "sidecar_sqs_requests", "SQS API requests by operation.", ["operation"], registry=r
        )
        self.transcriptions = Counter(
            "sidecar_transcriptions", "Transcripts by source (api call or stored result).", ["source"], registry=r
        )
        self.queue_messages = Gauge(
            "sidecar_queue_messages", "Approximate queue depth.", ["queue", "state"], registry=r
        )
        self.heartbeats = Counter(
            "sidecar_heartbeats", "Visibility extensions by result.", ["result"], registry=r
        )
        self.backpressure_seconds = Counter(
            "sidecar_backpressure_seconds", "Seconds transcription starts were paused by rate limits.", registry=r
        )
        self.last_poll = Gauge(
            "sidecar_last_poll_timestamp_seconds", "Unix time of the last successful receive.", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class SidePortServer:
    """Serves GET /metrics and GET /health on METRICS_HOST:METRICS_PORT in a background thread."""

    def __init__(self, metrics: Metrics, health: Callable[[], tuple[bool, dict[str, Any]]], *,
                 host: str, port: int) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            server_version = f"salestrainer-sidecar/{__version__}"

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, outer.metrics.render(), CONTENT_TYPE_LATEST)
                elif path == "/health":
                    ok, body = outer.health()
                    self._send(200 if ok else 503, json.dumps(body).encode(), "application/json")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # scrapes every 15 s would drown the job log

        self.metrics = metrics
        self.health = health
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="side-port", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> SidePortServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

