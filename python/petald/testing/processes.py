"""Real `petald` daemon processes for tests and benchmarks: started on 127.0.0.1 port 0, ready
when they print their JSON ready line (waited for under a deadline, never with sleeps), stopped
with SIGTERM and, if they do not exit in time, SIGKILL — only processes we started, by PID."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    ready: dict = field(default_factory=dict)
    output: list[str] = field(default_factory=list)

    @property
    def peer_id(self) -> str:
        return self.ready["peer_id"]

    @property
    def addr(self) -> str:
        """The first full multiaddr (…/p2p/<peer id>)."""
        return self.ready["addrs"][0]

    def read_event(self, event: str, *, timeout: float) -> dict:
        """Reads stdout lines until a JSON line with this event arrives; raises on timeout or
        exit. Non-JSON lines are kept in `output` for failure messages."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            while (left := deadline - time.monotonic()) > 0:
                if not sel.select(left):
                    break
                line = self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"daemon exited ({self.proc.wait()}): {self.log()}")
                text = line.decode(errors="replace").rstrip()
                self.output.append(text)
                try:
                    msg = json.loads(text)
                except json.JSONDecodeError:
                    continue
                if isinstance(msg, dict) and msg.get("event") == event:
                    return msg
        finally:
            sel.close()
        raise TimeoutError(f"no {event!r} line within {timeout} s: {self.log()}")

    def log(self) -> str:
        return "\n".join(self.output[-40:])

    def stop(self, *, timeout: float = 20.0, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.output.extend(self.proc.stdout.read().decode(errors="replace").splitlines())
            self.proc.stdout.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: the daemon gets no chance to say goodbye (failure tests)."""
        self.stop(sig=signal.SIGKILL)

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_daemon(
    command: str,
    *args: str,
    identity: Path,
    ready_timeout: float = 60.0,
    env: dict[str, str] | None = None,
) -> DaemonProcess:
    """Starts `petald <command> --listen /ip4/127.0.0.1/tcp/0 ... <args>` and waits until it
    is ready. stderr is merged into stdout so a failure shows the daemon's own words."""
    cmd = [sys.executable, "-m", "petald.cli", command, "--listen", "/ip4/127.0.0.1/tcp/0"]
    cmd += ["--identity", str(identity), *args]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    daemon = DaemonProcess(proc)
    try:
        daemon.ready = daemon.read_event("ready", timeout=ready_timeout)
    except BaseException:
        daemon.stop()
        raise
    return daemon
