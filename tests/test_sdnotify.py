"""systemd notify over a real unix datagram socket: READY once, WATCHDOG, STOPPING; a no-op without one."""

from __future__ import annotations

import socket

import pytest

from consumer.sdnotify import Notifier
from tests.conftest import send_job, upload
from tests.stack import wait_for


@pytest.fixture
def manager(tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    yield path, sock
    sock.close()


def test_ready_is_sent_once(manager):
    path, sock = manager
    n = Notifier(path)
    n.ready("polling")
    n.ready("polling again")
    n.watchdog()
    assert sock.recv(4096) == b"READY=1\nSTATUS=polling"
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_without_socket_it_is_a_no_op():
    n = Notifier(None)
    assert not n.enabled
    n.ready("x")
    n.stopping("y")


def test_abstract_namespace_address():
    assert Notifier("@sd/notify").address == "\0sd/notify"


def test_daemon_notifies_ready_watchdog_and_stopping(manager, run_daemon, aws, wordpress, make_settings):
    path, sock = manager
    import threading

    from consumer.app import build_daemon
    from consumer.aws import make_clients

    settings = make_settings()
    sqs, s3 = make_clients(settings)
    daemon = build_daemon(settings, sqs=sqs, s3=s3, notifier=Notifier(path))
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    messages = []

    def got(prefix: str) -> bool:
        while not any(m.startswith(prefix) for m in messages):
            messages.append(sock.recv(4096).decode())
        return True

    wait_for(lambda: got("READY=1"), timeout=20, what="READY=1")
    wait_for(lambda: got("WATCHDOG=1"), timeout=20, what="WATCHDOG=1")
    wait_for(lambda: got("STATUS=polling; "), timeout=30, what="a STATUS= line with the jobs in flight")
    upload(aws, "audio/n.wav")
    send_job(aws, "notify-1", "audio/n.wav")
    wait_for(lambda: wordpress.terminal("notify-1"), timeout=30, what="job done")
    daemon.worker.request_stop()
    wait_for(lambda: got("STOPPING=1"), timeout=20, what="STOPPING=1")
    thread.join(20)
    assert not thread.is_alive()
