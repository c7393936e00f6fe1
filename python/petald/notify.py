"""The systemd notify protocol (sd_notify(3)) for the daemons, without libsystemd: one datagram
of `KEY=VALUE` lines per message on the unix socket named by $NOTIFY_SOCKET (a path, or `@name`
in the abstract namespace). `petald serve` and `petald node` say `STATUS=` while they join and
load, `READY=1` once online, `STOPPING=1` when they start to drain, and `WATCHDOG=1` from the
trio loop every $WATCHDOG_USEC/2 — so a loop that hangs stops pinging and systemd restarts the
service. Without $NOTIFY_SOCKET every call is a no-op, and a socket that is gone costs one
warning, never the daemon.

The compute process (petald.server.worker) reports its loading progress through a relay: the
daemon points the children's $NOTIFY_SOCKET at a socket of its own (`relay_children()`) and
forwards only their `STATUS=` lines, from the main PID, as systemd's `NotifyAccess=main` wants.

Entry points: `notifier()` (this process's `Notifier`), `Notifier.run(task_status=...)` in the
daemon's nursery (watchdog pings and the relay)."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from collections.abc import MutableMapping
from pathlib import Path

import trio

log = logging.getLogger(__name__)

SEND_TIMEOUT = 1.0  # seconds a send may block on a full socket before the message is dropped
MAX_RELAYED = 256  # characters of a child's STATUS line passed on (a status is one short line)


def socket_address(name: str) -> str | bytes:
    """$NOTIFY_SOCKET as `sendto` takes it: `@name` is the abstract namespace (a leading NUL)."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


class Notifier:
    """This process's end of the notify socket. `status(text, part=...)` keeps one line per part
    (the daemon's own step, the compute process's progress) and sends them joined by '; '."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec else None
        self._sock: socket.socket | None = None
        self._failed = False
        self._parts: dict[str, str] = {}
        self._relay: tuple[socket.socket, Path] | None = None

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str]) -> Notifier:
        """Reads and removes $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID (as sd_notify's
        unset_environment does: the children we start are not the service's main process). The
        watchdog is ours unless $WATCHDOG_PID names another process."""
        address = environ.pop("NOTIFY_SOCKET", "") or None
        usec, pid = environ.pop("WATCHDOG_USEC", ""), environ.pop("WATCHDOG_PID", "")
        watchdog = int(usec) if usec.isdigit() and int(usec) > 0 else None
        if pid and pid != str(os.getpid()):
            watchdog = None
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Sends one message (its lines together, as one datagram); False if not sent."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.settimeout(SEND_TIMEOUT)
            self._sock.sendto("\n".join(fields).encode(), socket_address(self.address))
        except OSError as e:
            # systemd re-executing, the socket removed or full: the service goes on without it,
            # and tries again with the next message (a watchdog that stopped for good would
            # get a healthy daemon restarted once systemd is back).
            if not self._failed:
                log.warning("notify socket %s: %s (warned once)", self.address, e)
            self._failed = True
            return False
        return True

    def status(self, text: str, *, part: str = "main") -> None:
        if text:
            self._parts[part] = text
        else:
            self._parts.pop(part, None)
        self.send("STATUS=" + "; ".join(self._parts.values()))

    def clear(self, part: str) -> None:
        """Drops a part's line (e.g. the loading progress once loaded)."""
        self._parts.pop(part, None)

    def ready(self) -> None:
        """Startup is over: the loading progress is dropped, the last status line stays."""
        self._parts.pop("load", None)
        self.send("READY=1", "STATUS=" + "; ".join(self._parts.values()))

    def stopping(self, status: str) -> None:
        self._parts = {"main": status}
        self.send("STOPPING=1", f"STATUS={status}")

    def relay_children(self) -> None:
        """Points the $NOTIFY_SOCKET of processes started from now on at a socket of ours, in a
        fresh 0700 directory; `run` forwards their STATUS lines. A no-op when not notifying."""
        if self.address is None or self._relay is not None:
            return
        directory = Path(tempfile.mkdtemp(prefix="petald-notify-"))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(directory / "notify"))
        sock.setblocking(False)
        self._relay = (sock, directory)
        os.environ["NOTIFY_SOCKET"] = str(directory / "notify")

    def close(self) -> None:
        if self._relay is not None:
            sock, directory = self._relay
            sock.close()
            shutil.rmtree(directory, ignore_errors=True)
            self._relay = None
            os.environ.pop("NOTIFY_SOCKET", None)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Pings the watchdog from the trio loop (a hung loop stops the pings) and forwards the
        children's STATUS lines, until cancelled."""
        async with trio.open_nursery() as nursery:
            if self.watchdog_interval is not None and self.enabled:
                nursery.start_soon(self._watchdog, self.watchdog_interval)
            if self._relay is not None:
                nursery.start_soon(self._forward, trio.socket.from_stdlib_socket(self._relay[0]))
            task_status.started()

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.send("WATCHDOG=1")
            await trio.sleep(interval)

    async def _forward(self, sock: trio.socket.SocketType) -> None:
        while True:
            data = await sock.recv(4096)
            for line in data.decode(errors="replace").splitlines():
                if line.startswith("STATUS="):  # nothing else: READY and the rest are ours
                    self.status(line[len("STATUS=") :][:MAX_RELAYED], part="load")


_notifier: Notifier | None = None


def notifier() -> Notifier:
    """This process's notifier, made from (and removing) the environment on first use."""
    global _notifier
    if _notifier is None:
        _notifier = Notifier.from_environ(os.environ)
    return _notifier
