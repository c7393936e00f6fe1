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
    _pending: bytes = b""

    @property
    def peer_id(self) -> str:
        return self.ready["peer_id"]

    @property
    def addr(self) -> str:
        """The first full multiaddr (…/p2p/<peer id>)."""
        return self.ready["addrs"][0]

    def read_event(self, event: str, *, timeout: float) -> dict:
        """Reads stdout lines until a JSON line with this event arrives; raises on timeout or
        exit. Non-JSON lines are kept in `output` for failure messages.

        Reads the raw fd with os.read and splits lines itself: a buffered readline() can pull
        several lines into Python's buffer, after which select() sees nothing on the fd and a
        line that already arrived would wait for the timeout."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while True:
                while b"\n" in self._pending:
                    raw, self._pending = self._pending.split(b"\n", 1)
                    text = raw.decode(errors="replace").rstrip()
                    self.output.append(text)
                    try:
                        msg = json.loads(text)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(msg, dict) and msg.get("event") == event:
                        return msg
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise TimeoutError(f"no {event!r} line within {timeout} s: {self.log()}")
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"daemon exited ({self.proc.wait()}): {self.log()}")
                self._pending += chunk

    def wait_ready(self, timeout: float) -> dict:
        try:
            self.ready = self.read_event("ready", timeout=timeout)
        except BaseException:
            self.stop()
            raise
        return self.ready

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
        if self.proc.stdout is not None and not self.proc.stdout.closed:
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


def spawn_daemon(
    command: str, *args: str, identity: Path, env: dict[str, str] | None = None
) -> DaemonProcess:
    """Starts `petald <command> --listen /ip4/127.0.0.1/tcp/0 ... <args>` without waiting.
    stderr is merged into stdout so a failure shows the daemon's own words."""
    cmd = [sys.executable, "-m", "petald.cli", command, "--listen", "/ip4/127.0.0.1/tcp/0"]
    cmd += ["--identity", str(identity), *args]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    return DaemonProcess(proc)


def start_announcer(
    model: str, blocks: str, *args: str, ready_timeout: float = 60.0
) -> DaemonProcess:
    """Starts `python -m petald.testing.announcer MODEL BLOCKS ...` and waits until ready."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "petald.testing.announcer", model, blocks, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    daemon = DaemonProcess(proc)
    daemon.wait_ready(ready_timeout)
    return daemon


def start_daemon(
    command: str,
    *args: str,
    identity: Path,
    ready_timeout: float = 60.0,
    env: dict[str, str] | None = None,
) -> DaemonProcess:
    """`spawn_daemon`, then wait until it is ready (its JSON ready line)."""
    daemon = spawn_daemon(command, *args, identity=identity, env=env)
    daemon.wait_ready(ready_timeout)
    return daemon


def start_swarm(n: int, tmp: Path, *, ready_timeout: float = 90.0) -> list[DaemonProcess]:
    """A bootstrap `petald node --new-swarm` and n-1 more joining through it, started in
    parallel. The caller stops them (`stop_all`)."""
    first = start_daemon("node", "--new-swarm", identity=tmp / "node0.key")
    rest = [
        spawn_daemon("node", "--initial-peers", first.addr, identity=tmp / f"node{i}.key")
        for i in range(1, n)
    ]
    try:
        for d in rest:
            d.wait_ready(ready_timeout)
    except BaseException:
        stop_all([first, *rest])
        raise
    return [first, *rest]


def stop_all(daemons: list[DaemonProcess]) -> None:
    for d in daemons:
        if d.proc.poll() is None:
            d.proc.send_signal(signal.SIGTERM)
    for d in daemons:
        d.stop()


def petald_json(*args: str, timeout: float = 90) -> dict:
    """Runs a short-lived `petald` command and returns its JSON result line."""
    r = subprocess.run(
        [sys.executable, "-m", "petald.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def petald_json_many(commands: list[list[str]], timeout: float = 120) -> list[dict]:
    """Runs several `petald` commands concurrently (each is its own client process)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "petald.cli", *c],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        for c in commands
    ]
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            assert p.returncode == 0, stdout + stderr
            out.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out
