"""systemd's notify protocol (sd_notify(3)): one datagram per state change to $NOTIFY_SOCKET.

Written here because the protocol is a single sendto() and the maintained bindings need libsystemd at
build time. Without NOTIFY_SOCKET (not under systemd, or Type=simple) every call is a no-op.
"""

from __future__ import annotations

import logging
import socket

log = logging.getLogger(__name__)


class Notifier:
    """Sends READY=1, STATUS=, WATCHDOG=1 and STOPPING=1 to the service manager."""

    def __init__(self, socket_path: str | None) -> None:
        self.address: str | None = None
        if socket_path:
            # A leading '@' names a socket in the abstract namespace.
            self.address = "\0" + socket_path[1:] if socket_path.startswith("@") else socket_path
        self.ready_sent = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> None:
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:  # the manager going away must never stop the daemon
            log.warning("sd_notify_failed", extra={"error": str(exc)})

    def ready(self, status: str) -> None:
        if not self.ready_sent:
            self.ready_sent = True
            self.send("READY=1", f"STATUS={status}")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")
