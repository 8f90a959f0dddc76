"""Wiring: the private temp directory, the DLQ found from the redrive policy, /health going 503."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from consumer.app import find_dlq, private_workdir
from consumer.metrics import SidePortServer
from consumer.sqs import SqsQueue
from tests.conftest import send_job, upload
from tests.stack import wait_for


def test_private_workdir_is_0700_and_crash_leftovers_are_removed(make_settings, tmp_path):
    settings = make_settings(temp_dir=str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    leftover = tmp_path / "salestrainer-sidecar" / dead
    leftover.mkdir(parents=True)
    (leftover / "original").write_bytes(b"audio of a crashed run")
    mine = private_workdir(settings)
    assert not leftover.exists()
    assert mine.name == str(os.getpid())
    assert stat.S_IMODE(mine.stat().st_mode) == 0o700
    assert stat.S_IMODE(mine.parent.stat().st_mode) == 0o700


def test_temp_files_are_removed_on_every_path(run_daemon, aws, wordpress, make_settings, tmp_path):
    upload(aws, "audio/ok.wav")
    upload(aws, "audio/bad.webm", data=b"\x1a\x45\xdf\xa3 not really webm" * 100)
    send_job(aws, "tmp-ok", "audio/ok.wav")
    send_job(aws, "tmp-bad", "audio/bad.webm")
    rd = run_daemon()
    wait_for(lambda: wordpress.terminal("tmp-ok") and wordpress.terminal("tmp-bad"), timeout=30, what="both")
    workdir = rd.daemon.workdir
    wait_for(lambda: workdir.exists() and not any(workdir.iterdir()), timeout=10, what="empty workdir")
    rd.stop()
    assert not workdir.exists()


def test_dlq_is_found_from_the_redrive_policy(aws, make_settings):
    queue = SqsQueue(aws.sqs, aws.queue_url)
    url, max_receives = find_dlq(aws.sqs, queue, make_settings(sqs_dlq_url=None))
    assert url == aws.dlq_url and max_receives == 5


def test_health_reports_a_stalled_poll_loop(run_daemon, aws):
    rd = run_daemon(serve=True, health_stall_seconds=1.5)
    port = rd.daemon.side_port.port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        assert r.status == 200
    rd.stop()

    # The poller is stopped now, so nothing ticks: a controllable clock says a minute has passed.
    worker = rd.daemon.worker
    now = [worker.last_tick]
    worker.clock = lambda: now[0]
    now[0] += 60
    server = SidePortServer(rd.daemon.metrics, worker.health, host="127.0.0.1", port=0).start()
    try:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health", timeout=5)
        assert err.value.code == 503
        body = json.loads(err.value.read())
        assert body["status"] == "stalled" and body["last_poll_age_s"] == 60
        assert set(body) == {"status", "version", "package_version", "last_poll_age_s", "in_flight"}  # no configuration
    finally:
        server.stop()
