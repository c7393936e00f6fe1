"""Real `petald` daemon processes for tests and benchmarks: started on 127.0.0.1 port 0, ready
when they print their JSON ready line (waited for under a deadline, never with sleeps), stopped
with SIGTERM and, if they do not exit in time, SIGKILL — only processes we started, by PID.

`Processes` owns every daemon started through it and stops them all when its `with` block ends,
however it ends (a second start failing, an assertion in between): the swarm tests' `procs`
fixture is one. The free functions (`start_daemon`, `stop_all`, ...) leave that to the caller."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STOP_TIMEOUT = 20.0  # seconds a daemon gets to exit after SIGTERM, before SIGKILL
DRAIN_TIMEOUT = 5.0  # seconds to read a stopped daemon's last output (a survivor may hold it)


class DaemonExited(RuntimeError):
    """A daemon exited before printing the line it was waited for; the message ends with its
    last output lines (its own error message among them)."""

    def __init__(self, message: str, returncode: int) -> None:
        super().__init__(message)
        self.returncode = returncode


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    ready: dict = field(default_factory=dict)
    output: list[str] = field(default_factory=list)
    _pending: bytes = b""

    @property
    def name(self) -> str:
        """`petald serve`, `petald node`, ... (or the program) for messages."""
        if isinstance(self.proc.args, str | bytes | os.PathLike):
            return str(self.proc.args)
        args = [str(a) for a in self.proc.args]
        if "petald.cli" in args[:-1]:
            return f"petald {args[args.index('petald.cli') + 1]}"
        return " ".join(args[:3])

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

        def match(text: str) -> dict | None:
            try:
                msg = json.loads(text)
            except json.JSONDecodeError:
                return None
            return msg if isinstance(msg, dict) and msg.get("event") == event else None

        return self._read_until(match, repr(event), timeout=timeout)

    def read_line_containing(self, text: str, *, timeout: float) -> str:
        """Reads output lines (logs included: stderr is merged) until one contains `text`, in
        the lines read so far or in new ones; raises on timeout or exit."""
        for line in self.output:
            if text in line:
                return line
        found = self._read_until(
            lambda line: line if text in line else None, repr(text), timeout=timeout
        )
        return str(found)

    def _read_until(self, match: Any, what: str, *, timeout: float) -> Any:
        """Reads stdout lines (kept in `output`) until `match(line)` is not None; returns it.

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
                    found = match(text)
                    if found is not None:
                        return found
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise TimeoutError(
                        f"{self.name}: no {what} line within {timeout} s:\n{self.log()}"
                    )
                chunk = os.read(fd, 65536)
                if not chunk:
                    code = self.proc.wait()
                    raise DaemonExited(
                        f"{self.name} (pid {self.proc.pid}) exited with status {code} before "
                        f"its {what} line:\n{self.log()}",
                        code,
                    )
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

    def stop(self, *, timeout: float = STOP_TIMEOUT, sig: int = signal.SIGTERM) -> int:
        """Sends `sig` if it is still running, SIGKILLs it if it has not exited `timeout` s
        later; reaps it and keeps its last output. Idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self._reap(time.monotonic() + timeout)

    def _reap(self, deadline: float) -> int:
        """Waits for the exit until `deadline` (monotonic), then SIGKILLs it; reaps it. Never a
        second SIGTERM: a daemon takes that as "stop at once" (`petald serve` skips its
        drain), and one that arrives after the daemon restored the default handler on its way
        out kills it mid-exit (status -15 instead of 0)."""
        try:
            self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._drain(DRAIN_TIMEOUT)
        return self.proc.returncode

    def _drain(self, timeout: float) -> None:
        """Reads what is left on stdout until EOF, bounded: a process the daemon started
        (which inherits its stderr) could hold the pipe open after the daemon is gone."""
        out = self.proc.stdout
        if out is None or out.closed:
            return
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(out.fileno(), selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0 and sel.select(left):
                chunk = os.read(out.fileno(), 65536)
                if not chunk:
                    break
                self._pending += chunk
        out.close()
        if self._pending:
            self.output.extend(self._pending.decode(errors="replace").splitlines())
            self._pending = b""

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
        # Hermetic: a config file on the machine (/etc/petald/petald.toml) does not apply.
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PETALD_NO_CONFIG": "1", **(env or {})},
    )
    return DaemonProcess(proc)


def spawn_announcer(model: str, blocks: str, *args: str) -> DaemonProcess:
    """Starts `python -m petald.testing.announcer MODEL BLOCKS ...` without waiting."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "petald.testing.announcer", model, blocks, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return DaemonProcess(proc)


def start_announcer(
    model: str, blocks: str, *args: str, ready_timeout: float = 60.0
) -> DaemonProcess:
    """`spawn_announcer`, then wait until it is ready."""
    daemon = spawn_announcer(model, blocks, *args)
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
    """`Processes.swarm` for a caller that stops them itself (`stop_all`); if one fails to
    start, all are stopped."""
    procs = Processes()
    try:
        return procs.swarm(n, tmp, ready_timeout=ready_timeout)
    except BaseException:
        procs.close()
        raise


def stop_all(daemons: Iterable[DaemonProcess], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM to every one still running (in the given order); any not gone `timeout` s later
    is SIGKILLed; all are reaped. One that fails to stop does not keep the others running: the
    first error is raised once all were tried."""
    daemons = list(daemons)
    for d in daemons:
        if d.proc.poll() is None:
            d.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    errors: list[BaseException] = []
    for d in daemons:
        try:
            d._reap(deadline)
        except BaseException as e:  # re-raised below, once the others were tried
            errors.append(e)
    if errors:
        raise errors[0]


class Processes:
    """Owns the processes started through it (`spawn`, `start`, `announcer`, `swarm`, or
    `adopt` for one started otherwise). Leaving the `with` block, however it is left, stops
    them all in reverse order of start: SIGTERM to every one, then each waited for under a
    deadline, SIGKILLed past it and reaped. Processes they started themselves (a server's
    compute process), seen just before, must exit with them; any left at the deadline is
    SIGKILLed through its pidfd and reported as an AssertionError."""

    def __init__(self, stop_timeout: float = STOP_TIMEOUT) -> None:
        self.stop_timeout = stop_timeout
        self._owned: list[DaemonProcess] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        return [d.proc.pid for d in self._owned]

    def adopt(self, proc: DaemonProcess | subprocess.Popen[Any]) -> DaemonProcess:
        """Owns a process started otherwise (a command in a namespace, a chat)."""
        daemon = proc if isinstance(proc, DaemonProcess) else DaemonProcess(proc)
        self._owned.append(daemon)
        return daemon

    def spawn(
        self, command: str, *args: str, identity: Path, env: dict[str, str] | None = None
    ) -> DaemonProcess:
        """`spawn_daemon`, owned: starts it without waiting for its ready line."""
        return self.adopt(spawn_daemon(command, *args, identity=identity, env=env))

    def start(
        self,
        command: str,
        *args: str,
        identity: Path,
        ready_timeout: float = 60.0,
        env: dict[str, str] | None = None,
    ) -> DaemonProcess:
        """`start_daemon`, owned: also when it fails to become ready."""
        daemon = self.spawn(command, *args, identity=identity, env=env)
        daemon.wait_ready(ready_timeout)
        return daemon

    def announcer(
        self, model: str, blocks: str, *args: str, ready_timeout: float = 60.0
    ) -> DaemonProcess:
        """`start_announcer`, owned."""
        daemon = self.adopt(spawn_announcer(model, blocks, *args))
        daemon.wait_ready(ready_timeout)
        return daemon

    def swarm(self, n: int, tmp: Path, *, ready_timeout: float = 90.0) -> list[DaemonProcess]:
        """A bootstrap `petald node --new-swarm` and n-1 more joining through it, started in
        parallel (`start_swarm`, owned)."""
        first = self.start("node", "--new-swarm", identity=tmp / "node0.key")
        rest = [
            self.spawn("node", "--initial-peers", first.addr, identity=tmp / f"node{i}.key")
            for i in range(1, n)
        ]
        for d in rest:
            d.wait_ready(ready_timeout)
        return [first, *rest]

    def close(self) -> None:
        owned, self._owned = self._owned[::-1], []
        below = descendants(*(d.proc.pid for d in owned if d.proc.poll() is None))
        try:
            stop_all(owned, timeout=self.stop_timeout)
        finally:
            left = still_running(below, self.stop_timeout)
            for pid in left:
                with contextlib.suppress(ProcessLookupError):  # it just exited
                    signal.pidfd_send_signal(below[pid], signal.SIGKILL)
            for fd in below.values():
                os.close(fd)
        if left:
            raise AssertionError(f"processes outlived the daemons that started them: {left}")


def descendants(*roots: int) -> dict[int, int]:
    """{pid: pidfd} of every live process below the `roots` (from /proc's parent links). A
    pidfd turns readable when its process exits and names that process even if the number is
    reused. The caller closes the fds."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: dict[int, int] = {}
    frontier = list(roots)
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                try:
                    found[child] = os.pidfd_open(child)
                except ProcessLookupError:
                    continue
                frontier.append(child)
    return found


def processes_naming(text: str) -> list[int]:
    """PIDs of the live processes (other than us) whose command line contains `text`, e.g. a
    test's own temporary directory: catches any we never saw the PID of."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def still_running(pidfds: dict[int, int], timeout: float) -> list[int]:
    """Waits up to `timeout` s for every process of `pidfds` ({pid: pidfd}) to exit; returns
    the PIDs of those still running then."""
    deadline = time.monotonic() + timeout
    left = dict(pidfds)
    with selectors.DefaultSelector() as sel:
        for pid, fd in left.items():
            sel.register(fd, selectors.EVENT_READ, pid)
        while left:
            wait = deadline - time.monotonic()
            for key, _ in sel.select(max(wait, 0)):  # past the deadline: a last look
                sel.unregister(key.fd)
                left.pop(key.data)
            if wait <= 0:
                break
    return sorted(left)


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
