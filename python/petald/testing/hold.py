"""Holding a real `petald serve`'s compute process still, for tests that need a server in a
given state without timing: `pause(compute_pid(server))` stops it (SIGSTOP, waited for), so the
requests the daemon hands it queue up behind the one it holds (`info`'s "queued" counts them);
`resume` lets it go on. `held_compute_env(dir)` is the environment of a `petald serve` whose
compute process stops itself as it starts, before loading anything: the daemon joins and
announces the span as joining, and stays so until the test resumes it.

Only processes the test started (below a `DaemonProcess` it owns), by PID."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from petald.testing.processes import DaemonProcess

WORKER_MODULE = "petald.server.worker"

# Imported by every Python process started with the environment of `held_compute_env`; only
# the compute process (python -m petald.server.worker) stops itself.
_SITECUSTOMIZE = f"""\
import os, signal
try:
    with open("/proc/self/cmdline", "rb") as f:
        _args = f.read().split(b"\\0")
except OSError:
    _args = []
if b"{WORKER_MODULE}" in _args:
    os.kill(os.getpid(), signal.SIGSTOP)
"""


def held_compute_env(directory: Path) -> dict[str, str]:
    """Environment additions for `Processes.spawn("serve", ..., env=...)`: its compute process
    stops itself (SIGSTOP) before importing anything, until `resume(compute_pid(server))`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": f"{directory}{os.pathsep}{path}" if path else str(directory)}


def _stat(pid: int) -> tuple[str, int]:
    """(state letter, parent pid) from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def compute_pid(server: DaemonProcess, *, timeout: float = 10.0) -> int:
    """The PID of `server`'s compute process (its child running petald.server.worker); waits
    up to `timeout` s for it to appear (a server with --num-blocks starts it once joined)."""
    deadline = time.monotonic() + timeout
    while True:  # bounded by the deadline; each round is one scan of /proc
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if _stat(int(entry.name))[1] != server.proc.pid:
                    continue
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):  # exited meanwhile
                continue
            if WORKER_MODULE.encode() in args:
                return int(entry.name)
        if time.monotonic() > deadline or server.proc.poll() is not None:
            raise AssertionError(f"{server.name} has no compute process:\n{server.log()}")
        time.sleep(0.02)


def wait_stopped(pid: int, *, timeout: float = 10.0) -> None:
    """Waits until process `pid` is stopped (state T), bounded."""
    deadline = time.monotonic() + timeout
    while _stat(pid)[0] not in "Tt":  # a state change has no event to wait on: poll /proc
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} did not stop within {timeout} s")
        time.sleep(0.01)


def pause(pid: int) -> None:
    """SIGSTOP, returning once the process is stopped: nothing it was sent after this returns
    is answered until `resume`."""
    os.kill(pid, signal.SIGSTOP)
    wait_stopped(pid)


def resume(pid: int) -> None:
    os.kill(pid, signal.SIGCONT)
