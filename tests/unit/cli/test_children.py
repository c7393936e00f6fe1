"""Processes a command starts and owns (`petald.cli.children`), with stand-in children (small
Python programs) instead of daemons: the ready line is found among other output and logged,
a child that dies first fails with its last words, a silent one times out, and stopping
escalates from SIGTERM to SIGKILL for a child that ignores SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from petald.cli.children import Child, ChildFailed, stop_children

READY = json.dumps({"event": "ready", "peer_id": "p", "addrs": ["/ip4/127.0.0.1/tcp/1/p2p/p"]})
SAY_READY_AND_WAIT = f"import sys; print({READY!r}, flush=True); sys.stdin.read()"


def child(tmp: Path, program: str, name: str = "child") -> Child:
    proc = subprocess.Popen(
        [sys.executable, "-c", program],
        stdin=subprocess.PIPE,  # never written: a child reading it waits until stopped
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    return Child(proc, name, tmp / f"{name}.log")


def test_ready_line_among_other_output_and_all_of_it_logged(tmp_path: Path) -> None:
    c = child(tmp_path, f"print('loading'); {SAY_READY_AND_WAIT}")
    try:
        c.wait_ready(30)
        assert c.addr == "/ip4/127.0.0.1/tcp/1/p2p/p"
        c.check_alive()
    finally:
        stop_children([c])
    assert c.proc.returncode == -signal.SIGTERM
    assert (tmp_path / "child.log").read_text().splitlines() == ["loading", READY]


def test_a_child_that_exits_first_fails_with_its_last_words(tmp_path: Path) -> None:
    c = child(tmp_path, "import sys; print('cannot load: no such file'); sys.exit(3)", "server0")
    with pytest.raises(ChildFailed, match=r"server0 exited with status 3:\n  \| cannot load"):
        c.wait_ready(30)
    stop_children([c])


def test_a_silent_child_times_out_or_returns_when_asked(tmp_path: Path) -> None:
    c = child(tmp_path, "import sys; sys.stdin.read()")
    try:
        c.wait_ready(0.2, raise_timeout=False)
        assert c.ready is None
        with pytest.raises(ChildFailed, match="not ready within"):
            c.wait_ready(0.2)
    finally:
        stop_children([c])


def test_sigterm_then_sigkill_for_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    stubborn = child(
        tmp_path,
        f"import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); {SAY_READY_AND_WAIT}",
        "stubborn",
    )
    polite = child(tmp_path, SAY_READY_AND_WAIT, "polite")
    for c in (stubborn, polite):
        c.wait_ready(30)  # SIGTERM is ignored from here on
    stop_children([stubborn, polite], timeout=0.5)
    assert polite.proc.returncode == -signal.SIGTERM
    assert stubborn.proc.returncode == -signal.SIGKILL
