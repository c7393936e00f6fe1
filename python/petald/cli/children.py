"""`petald` daemons that a command starts and owns (the local swarm of `petald chat` and
`petald demo`): `Child.spawn` starts one, a thread per child copies its output into a log file
and watches for its JSON ready line, and `stop_children` ends them — SIGTERM, then SIGKILL after
a deadline, by PID, only processes we started.

Children run in their own session, so a Ctrl-C at the terminal reaches only us and we stop them
in order; on Linux each also gets PR_SET_PDEATHSIG, so that even a SIGKILL of the parent, which
runs no cleanup, does not leave servers behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from petald.errors import PetaldError

STOP_TIMEOUT = 15.0  # seconds all children get to exit after SIGTERM, before SIGKILL
TAIL_LINES = 30

# Runs in the child between fork and exec of `python -m petald.cli`: asks the kernel to send it
# SIGTERM when the parent thread that spawned it dies, then execs. A launcher instead of
# Popen(preexec_fn=...), which is unsafe once threads run (each child's reader is a thread).
# The getppid check closes the race where the parent died before prctl ran.
_LAUNCHER = """\
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit(143)
os.execv(sys.executable, [sys.executable, "-m", "petald.cli", *sys.argv[2:]])
"""


class ChildFailed(PetaldError):
    """A child exited before it was ready, or was not ready in time; the message ends with
    the tail of its output."""


class Child:
    """One started `petald` process; `ready` is its ready line once printed."""

    def __init__(self, proc: subprocess.Popen[bytes], name: str, log: Path) -> None:
        self.proc = proc
        self.name = name
        self.log = log
        self.ready: dict | None = None
        self._lines: deque[str] = deque(maxlen=TAIL_LINES)
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name=f"petald-{name}", daemon=True)
        self._reader.start()

    @classmethod
    def spawn(cls, command: str, args: list[str], *, name: str, identity: Path, log: Path):
        cmd = [command, "--listen", "/ip4/127.0.0.1/tcp/0", "--identity", str(identity), *args]
        if sys.platform == "linux":
            argv = [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *cmd]
        else:
            argv = [sys.executable, "-m", "petald.cli", *cmd]
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # Every flag it needs is given: no config file or PETALD_* layer (petald.cli.config)
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PETALD_NO_CONFIG": "1"},
            start_new_session=True,
        )
        return cls(proc, name, log)

    @property
    def addr(self) -> str:
        """The first full multiaddr (…/p2p/<peer id>) of its ready line."""
        assert self.ready is not None
        return self.ready["addrs"][0]

    def _read(self) -> None:
        """Copies every output line to the log and the tail, until EOF (the child exited)."""
        assert self.proc.stdout is not None
        with open(self.log, "ab") as log:
            for raw in self.proc.stdout:
                log.write(raw)
                log.flush()
                text = raw.decode(errors="replace").rstrip()
                ready = _ready_event(text)
                with self._changed:
                    self._lines.append(text)
                    if ready is not None and self.ready is None:
                        self.ready = ready
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_ready(self, timeout: float, *, raise_timeout: bool = True) -> None:
        """Returns once the ready line arrived; raises ChildFailed if the child exits first or
        after `timeout` seconds (with raise_timeout=False, just returns then)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.ready is None:
                if not self._reader.is_alive():
                    self.proc.wait()
                    self.check_alive()
                left = deadline - time.monotonic()
                if left <= 0:
                    if not raise_timeout:
                        return
                    msg = f"{self.name} not ready within {timeout:.0f} s:\n{self.tail()}"
                    raise ChildFailed(msg)
                self._changed.wait(left)

    def check_alive(self) -> None:
        """Raises ChildFailed, with the tail of its output, if the child has exited."""
        if self.proc.poll() is not None:
            self._reader.join(5.0)  # the last lines say why
            code = self.proc.returncode
            raise ChildFailed(f"{self.name} exited with status {code}:\n{self.tail()}")

    def tail(self) -> str:
        lines = list(self._lines)
        return "\n".join(f"  | {line}" for line in lines) or "  (no output)"


def _ready_event(text: str) -> dict | None:
    if not text.startswith("{"):
        return None
    try:
        msg = json.loads(text)
    except json.JSONDecodeError:
        return None
    return msg if isinstance(msg, dict) and msg.get("event") == "ready" else None


def stop_children(children: list[Child], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM to all (servers first, the bootstrap node last, so none of them spends its exit
    looking for a vanished peer), then SIGKILL to any still running at the deadline."""
    alive = [c for c in reversed(children) if c.proc.poll() is None]
    for c in alive:
        c.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for c in alive:
        try:
            c.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            c.proc.kill()
            c.proc.wait()
    for c in children:
        c._reader.join(5.0)  # EOF follows exit, unless a grandchild still holds the pipe
        if c.proc.stdout is not None and not c._reader.is_alive():
            c.proc.stdout.close()
