"""No process a swarm test starts outlives it, whatever fails (`petald.testing.Processes`, the
`procs` fixture).

- A `petald serve` that cannot start (blocks 0:3 of a 2-block model) raises DaemonExited, with
  the server's own message, out of the block that had started a bootstrap node before it. Leaving
  the block stops the node; the server and its compute process are gone too. Checked by PID,
  through pidfds (which name the process, even if its number were reused), and by a scan for any
  process naming the test's directory.
- A process deaf to SIGTERM is SIGKILLed at the stop deadline and reaped; a process it started
  that is still running then is SIGKILLed too and reported.

The compute process is held at its very start by a `sitecustomize` on the server's PYTHONPATH:
it connects to the test's Unix socket and waits until the test closes the connection. The test
reads its PID from the kernel (SO_PEERCRED) while it is certainly alive, then lets it go on to
load, and fail."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from petald.testing import DaemonExited, Processes, descendants, processes_naming, still_running

pytestmark = pytest.mark.slow

# Two blocks: `--blocks 0:3` is out of range, found by the compute process once it has read the
# config, before any weight (there are none).
TWO_BLOCK_LLAMA = {
    "model_type": "llama",
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 128,
}
HOLD_ENV = "PETALD_TEST_HOLD"
# Imported by every Python process that has the hook on its PYTHONPATH; only the compute process
# (`python -m petald.server.worker ...`) waits. If the test is gone, connect or recv fails, site
# prints the error and the process goes on.
HOLD_HOOK = f"""\
import os, socket, sys
if "petald.server.worker" in sys.orig_argv and {HOLD_ENV!r} in os.environ:
    _hold = socket.socket(socket.AF_UNIX)
    _hold.connect("\\0" + os.environ[{HOLD_ENV!r}])
    _hold.recv(1)  # b"" once the test closes its end
    _hold.close()
"""
# The server joins and spawns its compute process; then that process imports torch and
# transformers and reads the config: tens of seconds each on 2 busy cores.
HOLD_TIMEOUT = 180.0
FAIL_TIMEOUT = 180.0


def peer_pid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


def test_a_server_that_fails_to_start_leaves_no_process_behind(tmp_path: Path) -> None:
    model = tmp_path / "two-block-llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TWO_BLOCK_LLAMA))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOLD_HOOK)
    name = f"petald-test-hold-{os.getpid()}-{secrets.token_hex(4)}"  # abstract: no file
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p)
    env = {"PYTHONPATH": path, HOLD_ENV: name}
    pidfds: dict[int, int] = {}
    try:
        with socket.socket(socket.AF_UNIX) as hold:
            hold.bind("\0" + name)
            hold.listen(1)
            hold.settimeout(HOLD_TIMEOUT)
            with pytest.raises(DaemonExited) as failed, Processes() as procs:
                boot = procs.start("node", "--new-swarm", identity=tmp_path / "boot.key")
                server = procs.spawn(
                    "serve", str(model), "--blocks", "0:3", "--initial-peers", boot.addr,
                    "--throughput", "100", "--reachability", "public",
                    identity=tmp_path / "server.key", env=env,
                )  # fmt: skip
                conn, _ = hold.accept()
                with conn:  # the compute process waits until this closes
                    worker = peer_pid(conn)
                    for pid in (boot.proc.pid, server.proc.pid):
                        pidfds[pid] = os.pidfd_open(pid)
                    pidfds |= descendants(server.proc.pid)
                    assert worker in pidfds, f"{worker} is not below the server {server.proc.pid}"
                    cmdline = Path(f"/proc/{worker}/cmdline").read_bytes().split(b"\0")
                    assert b"petald.server.worker" in cmdline
                # Released: it finds the blocks out of range, and the server exits. Nothing
                # here stops the bootstrap node: only leaving the block does.
                server.wait_ready(FAIL_TIMEOUT)
        assert failed.value.returncode == 1
        assert "blocks 0:3 are out of range: the model has 2 blocks" in str(failed.value)
        assert "Traceback" not in str(failed.value)
        # The node was alive when the start failed, and stopped cleanly by SIGTERM then.
        assert boot.proc.returncode == 0 and '{"event": "stopped"}' in boot.output, boot.log()
        assert still_running(pidfds, 0) == [], f"of {sorted(pidfds)}"
        for pid in (boot.proc.pid, server.proc.pid):  # reaped, not zombies of ours
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert processes_naming(str(tmp_path)) == []
        said = next(x for x in str(failed.value).splitlines() if "out of range" in x)
        print(
            f"node {boot.proc.pid}, server {server.proc.pid} and its compute process {worker} "
            f"all gone after the server failed with {said.strip()!r}"
        )
    finally:
        for fd in pidfds.values():
            os.close(fd)


# Ignores SIGTERM; starts a child that outlives it; says its child's PID when both are set up.
DEAF = """\
import json, signal, subprocess, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}  # not holding our pipe
child = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"], **quiet)
print(json.dumps({"event": "ready", "child": child.pid}), flush=True)
signal.pause()
"""


def test_a_process_deaf_to_sigterm_is_killed_and_its_leftover_child_reported() -> None:
    procs = Processes(stop_timeout=2.0)
    deaf = procs.adopt(
        subprocess.Popen(
            [sys.executable, "-c", DEAF],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    )
    pidfds: dict[int, int] = {}
    try:
        child = deaf.wait_ready(60)["child"]
        pidfds = {deaf.proc.pid: os.pidfd_open(deaf.proc.pid), child: os.pidfd_open(child)}
        with pytest.raises(AssertionError, match=rf"outlived the daemons .*\[{child}\]"):
            procs.close()
        assert deaf.proc.returncode == -signal.SIGKILL  # past the deadline, and reaped
        # The child's SIGKILL went through its pidfd; its death is the kernel's, not ours.
        assert still_running(pidfds, 10) == []
    finally:
        procs.close()  # nothing left to stop: idempotent
        for fd in pidfds.values():
            os.close(fd)
