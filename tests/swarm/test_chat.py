"""`petald chat` driven as a person would, through a pseudo-terminal, with the real demo model.

- Out of the box (no --initial-peers): it starts a local swarm (a node and two servers, each
  half of SmolLM2-135M-Instruct), answers "What is the capital of France?" with Paris; the
  follow-up "And of Germany?" is answered with Berlin — a question that names no capital and no
  city, so the answer can only come from the history. After /reset the same follow-up gets no
  Berlin (checked against a local transformers run: without history the greedy answer is an
  unrelated apology). Answers stream: Ctrl-C while an answer is being generated, its first
  words already on the terminal, stops only that answer. /exit ends it with status 0, and every
  process it started (node, servers, their compute processes) is gone.
- Failing clients leave nothing behind: SIGINT and SIGKILL while the servers load, and a flag
  that is only found wrong after the bootstrap node started.
- Joining a swarm that lacks blocks prints which ones and how to serve them, without a
  traceback, and exits with status 1.

Greedy decoding throughout. Every read has a deadline; processes are waited for through pidfds
(no polling, no sleeps)."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from petald.testing import Processes, descendants, processes_naming, still_running

pytestmark = pytest.mark.slow

PROMPT = ">>> "
MODEL = "SmolLM2-135M-Instruct.Q4_1"
START_TIMEOUT = 400.0  # a local swarm of the demo model and the client on 2 busy cores
ANSWER_TIMEOUT = 120.0


def chat_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "petald.cli", "chat", "--greedy", "--max-new-tokens", "40", *args]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One petald cache for the module: the first chat converts the GGUF tokenizer, the
    others load it from there (and the user's own cache is left alone)."""
    return tmp_path_factory.mktemp("petald-cache")


def chat_env(tmp: Path, cache: Path) -> dict[str, str]:
    # TMPDIR: the local swarm's keys and logs go under the test's directory, so that any
    # leftover process would name it on its command line. TERM=dumb: readline adds no escapes.
    env = {"TMPDIR": str(tmp), "PETALD_CACHE_DIR": str(cache), "TERM": "dumb"}
    return {**os.environ, **env, "PYTHONUNBUFFERED": "1"}


class Terminal:
    """A process whose stdin, stdout and stderr are a pseudo-terminal, as in an interactive
    shell. `expect` reads until a pattern appears or its deadline passes."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
        )
        os.close(slave)
        self.text = ""  # everything read so far
        self.seen = 0  # where the next expect() starts looking

    def expect(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while not (m := regex.search(self.text, self.seen)):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.master], [], [], left)[0]:
                raise TimeoutError(f"no {pattern!r} within {timeout} s; output:\n{self.text}")
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the process closed the terminal (exited)
                chunk = b""
            if not chunk:
                raise EOFError(f"exited ({self.proc.wait()}) before {pattern!r}:\n{self.text}")
            self.text += chunk.decode(errors="replace").replace("\r\n", "\n")
        self.seen = m.end()
        return m

    def ask(self, line: str) -> str:
        """Types `line` and Enter; returns the answer (up to the next prompt)."""
        os.write(self.master, line.encode() + b"\r")
        self.expect(re.escape(line) + r"\n", 10)  # the terminal's echo
        start = self.seen
        m = self.expect(re.escape(PROMPT), ANSWER_TIMEOUT)
        return self.text[start : m.start()].strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


def assert_all_exit(pidfds: dict[int, int], timeout: float = 30.0) -> None:
    try:
        left = still_running(pidfds, timeout)
        assert not left, f"processes still running: {left}"
    finally:
        for fd in pidfds.values():
            os.close(fd)


def test_chat_out_of_the_box_with_history_reset_and_exit(tmp_path: Path, cache: Path) -> None:
    t0 = time.monotonic()
    term = Terminal(chat_argv(), chat_env(tmp_path, cache))
    try:
        term.expect(re.escape(PROMPT), START_TIMEOUT)
        started = time.monotonic() - t0
        pids = descendants(term.proc.pid)
        # The node, two servers and (at least) their compute processes.
        assert len(pids) >= 5, term.text

        t1 = time.monotonic()
        answer = term.ask("What is the capital of France?")
        first = time.monotonic() - t1
        assert "Paris" in answer, term.text

        t1 = time.monotonic()
        follow_up = term.ask("And of Germany?")
        second = time.monotonic() - t1
        assert "Berlin" in follow_up and "capital" in follow_up.lower(), term.text

        os.write(term.master, b"/reset\r")
        term.expect(r"\(conversation reset\)", 10)
        term.expect(re.escape(PROMPT), 10)
        without = term.ask("And of Germany?")
        assert "Berlin" not in without, term.text

        # Streaming, and Ctrl-C while an answer streams stops that answer only; the chat goes
        # on. The first words of a long answer (up to 40 tokens) are on the terminal while the
        # chat still generates: Ctrl-C then interrupts the answer. A chat that printed only
        # finished answers would show these words only once back at its prompt, where Ctrl-C
        # leaves, and "(answer interrupted" would never come. Deterministic up to the rest of
        # the answer (dozens of decode steps through two servers) being generated between the
        # terminal showing two words and the signal (was: counting the terminal's read() calls,
        # which depends on timing both ways).
        os.write(term.master, b"Tell me a long story about a dragon.\r")
        term.expect(r"dragon\.\n", 10)
        term.expect(r"\w+ \w+ ", ANSWER_TIMEOUT)  # the answer has begun
        os.kill(term.proc.pid, signal.SIGINT)
        term.expect(r"\(answer interrupted", 60)
        term.expect(re.escape(PROMPT), 10)
        again = term.ask("What is the capital of France?")
        assert "Paris" in again, term.text

        os.write(term.master, b"/exit\r")
        assert term.proc.wait(timeout=60) == 0, term.text
        assert_all_exit(pids)
        assert processes_naming(str(tmp_path)) == []
        print(
            f"chat ready in {started:.1f} s; answers in {first:.1f} s and {second:.1f} s "
            f"(the second continues the session); {len(pids)} processes stopped"
        )
    finally:
        term.close()


def spawn_chat(tmp: Path, cache: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        chat_argv(*args),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=chat_env(tmp, cache),
    )


def read_stderr_until(proc: subprocess.Popen[str], pattern: str, timeout: float) -> re.Match:
    """stderr lines until one matches (its reads bounded by select)."""
    assert proc.stderr is not None
    deadline, lines = time.monotonic() + timeout, []
    fd = proc.stderr.fileno()
    pending = b""
    while True:
        while b"\n" in pending:
            raw, pending = pending.split(b"\n", 1)
            lines.append(raw.decode(errors="replace"))
            if m := re.search(pattern, lines[-1]):
                return m
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError(f"no {pattern!r} within {timeout} s:\n" + "\n".join(lines))
        chunk = os.read(fd, 65536)
        if not chunk:
            raise EOFError(f"exited ({proc.wait()}) before {pattern!r}:\n" + "\n".join(lines))
        pending += chunk


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_no_process_outlives_a_chat_stopped_while_servers_load(
    tmp_path, cache, sig, procs: Processes
) -> None:
    """SIGINT (Ctrl-C): the chat stops its servers and node itself and exits with 130.
    SIGKILL: no cleanup runs in the chat; the kernel's parent-death signal stops them."""
    proc = procs.adopt(spawn_chat(tmp_path, cache)).proc
    m = read_stderr_until(proc, r"servers loading blocks .* \(pids ([\d ]+)\)", 120)
    started = [int(p) for p in m.group(1).split()]
    pidfds = {p: os.pidfd_open(p) for p in started}
    os.kill(proc.pid, sig)
    code = proc.wait(timeout=60)
    assert code == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    assert_all_exit(pidfds)
    assert processes_naming(str(tmp_path)) == []


def test_a_flag_found_wrong_after_the_node_started_leaves_nothing_behind(
    tmp_path, cache, procs: Processes
) -> None:
    """--servers 31: the demo model has 30 blocks, known only once the node is starting."""
    proc = procs.adopt(spawn_chat(tmp_path, cache, "--servers", "31")).proc
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert "--servers must be between 1 and the model's 30 blocks" in err
    assert "Traceback" not in err
    assert processes_naming(str(tmp_path)) == []


def test_a_swarm_missing_blocks_gets_a_clean_message(
    tmp_path: Path, cache: Path, procs: Processes
) -> None:
    """An announcer claims blocks 0:15 of the demo model; nobody serves 15:30."""
    node = procs.start("node", "--new-swarm", identity=tmp_path / "node.key")
    procs.announcer(MODEL, "0:15", "--n-blocks", "30", "--initial-peers", node.addr, "--ttl", "60")
    r = subprocess.run(
        chat_argv("--initial-peers", node.addr, "--wait", "5"),
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
        env=chat_env(tmp_path, cache),
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert "the swarm lacks blocks 15:30" in r.stderr, r.stderr
    assert "--blocks 15:30" in r.stderr and node.addr in r.stderr
