"""`Executor`: the daemon's handle on its compute process (petald.server.worker). It starts the
process, waits until the span is loaded, then passes it one request at a time — inference steps
before forward/backward work (`PriorityLock`), since a chat user waits on every step while a
training batch is throughput work. A compute process that dies takes the daemon down with a clear
message; a daemon that dies takes the compute process with it (a lifeline pipe, see the worker).

Entry point: `info = await nursery.start(executor.run)`, then `await executor.call(header, tensors,
priority=...)`; inference steps go through `await executor.step(sid, header, tensors)`, which
batches them with other sessions' (petald.server.batching). `spawn_worker(spec)` starts the
compute process ahead (outside trio, e.g. before the daemon has even imported py-libp2p) for an
`Executor(spec, process)` to take over."""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import trio

from petald.errors import PetaldError
from petald.server.batching import BatchConfig, Message, StepBatcher
from petald.server.openmp import with_openmp_defaults
from petald.server.startup import stamp
from petald.wire.frames import Frame
from petald.wire.messages import read_message, write_message
from petald.wire.streams import TrioByteStream

log = logging.getLogger(__name__)

INFERENCE, TRAINING = 0, 1  # priorities: lower is served first


def worker_env() -> dict[str, str]:
    """The compute process's environment: petald's OpenMP settings (petald.server.openmp; the
    daemon has them already when `petald serve` started it, an embedding program may not),
    unless the user set their own."""
    return with_openmp_defaults(os.environ)


class WorkerFailed(PetaldError):
    """The compute process could not load the span, or died."""


@dataclass
class WorkerProcess:
    """A started compute process: our end of its socket pair and the write end of its lifeline
    (it exits when that closes: we died)."""

    spec: dict[str, Any]
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    lifeline_w: int

    def close(self) -> None:
        """Kills it (if still running) and closes our ends; idempotent."""
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self.sock.close()
        if self.lifeline_w >= 0:
            os.close(self.lifeline_w)
            self.lifeline_w = -1


def spawn_worker(spec: dict[str, Any]) -> WorkerProcess:
    """Starts `python -m petald.server.worker` for `spec` without waiting for it."""
    ours, theirs = socket.socketpair()
    # The lifeline: we hold the write end (never inherited by anyone) until we die.
    lifeline_r, lifeline_w = os.pipe()
    os.set_inheritable(lifeline_w, False)
    argv = [sys.executable, "-m", "petald.server.worker", str(theirs.fileno())]
    stamp("daemon.worker_spawn")
    try:
        proc = subprocess.Popen(
            [*argv, json.dumps(spec), str(lifeline_r)],
            pass_fds=(theirs.fileno(), lifeline_r),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # stdout is the daemon's JSON channel; logs: stderr
            env=worker_env(),
        )
    except BaseException:
        ours.close()
        os.close(lifeline_w)
        raise
    finally:
        theirs.close()
        os.close(lifeline_r)
    return WorkerProcess(spec, proc, ours, lifeline_w)


async def wait_exit(proc: subprocess.Popen[bytes]) -> int:
    """Waits for `proc` to exit without blocking the trio loop (a pidfd on Linux)."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux, or an old kernel: a thread waits
        return await trio.to_thread.run_sync(proc.wait, abandon_on_cancel=True)
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    return proc.wait()


class PriorityLock:
    """One holder at a time; waiters get it by (priority, arrival). Cancel-safe: a waiter that is
    cancelled leaves the queue, and one cancelled just after being handed the lock passes it on."""

    def __init__(self) -> None:
        self._held = False
        self._waiters: list[list[Any]] = []  # heap of [priority, seq, event, cancelled]
        self._seq = itertools.count()

    async def acquire(self, priority: int) -> None:
        if not self._held and not self._waiters:
            self._held = True
            return
        entry = [priority, next(self._seq), trio.Event(), False]
        heapq.heappush(self._waiters, entry)
        try:
            await entry[2].wait()
        except BaseException:
            if entry[2].is_set():
                self.release()
            else:
                entry[3] = True
            raise

    def release(self) -> None:
        while self._waiters:
            entry = heapq.heappop(self._waiters)
            if not entry[3]:
                entry[2].set()  # the lock stays held: ownership moves to that waiter
                return
        self._held = False

    def queued(self) -> int:
        return sum(1 for e in self._waiters if not e[3])


class Executor:
    def __init__(
        self,
        spec: dict[str, Any],
        process: WorkerProcess | None = None,
        batching: BatchConfig | None = None,
    ) -> None:
        self.spec = spec
        self._process = process  # started ahead by `spawn_worker(spec)`; else `run` starts it
        self.info: dict[str, Any] = {}
        self._lock = PriorityLock()
        self._stream: TrioByteStream | None = None
        self._stopping = False
        self._batcher_waits = False  # the batcher is queued in _lock for its turn
        self._batcher = StepBatcher(self._exchange_steps, self._inference_turn, batching)

    @property
    def step_forwards(self) -> Counter[int]:
        """Forwards the compute process ran for inference steps, by sessions in each."""
        return self._batcher.forwards

    async def run(self, *, task_status: trio.TaskStatus[dict[str, Any]]) -> None:
        """Starts the compute process (unless it was started ahead) and serves until
        cancelled; started(info) once loaded."""
        process, self._process = self._process or spawn_worker(self.spec), None
        proc = process.proc
        stream = TrioByteStream(trio.SocketStream(trio.socket.from_stdlib_socket(process.sock)))
        try:
            try:
                header, _ = await read_message(stream, max_tensor_bytes=0)
            except PetaldError:
                code = await wait_exit(proc)
                raise WorkerFailed(f"the compute process exited ({code}) while loading") from None
            if "error" in header:
                raise WorkerFailed(f"loading failed: {header['error']}: {header.get('message')}")
            self.info = header
            self._stream = stream
            async with trio.open_nursery() as nursery:
                await nursery.start(self._batcher.run)
                task_status.started(header)
                code = await wait_exit(proc)
                nursery.cancel_scope.cancel()
            raise WorkerFailed(f"the compute process exited unexpectedly ({code})")
        finally:
            self._stream = None
            with trio.CancelScope(shield=True):
                await stream.aclose()
                if proc.poll() is None:
                    proc.kill()
                    with trio.move_on_after(10):
                        await wait_exit(proc)
                process.close()

    async def call(
        self,
        header: dict[str, Any],
        tensors: list[Frame] = (),
        *,
        priority: int,  # type: ignore[assignment]
    ) -> tuple[dict[str, Any], list[Frame]]:
        """Sends one request and returns the reply. Waits for its turn by priority; once sent,
        the exchange is shielded from cancellation (a half-read reply would desynchronise the
        pipe) — it ends when the worker answers or dies. Frames go both ways as they are: the
        daemon never decodes a tensor."""
        await self._lock.acquire(priority)
        try:
            with trio.CancelScope(shield=True):
                stream = self._stream
                if stream is None:
                    raise WorkerFailed("the compute process is not running")
                await write_message(stream, header, list(tensors))
                reply, out = await read_message(stream, frames=True)
                for key in ("rss", "peak_rss"):
                    if key in reply:
                        self.info[key] = reply.pop(key)
                return reply, out
        finally:
            self._lock.release()

    async def step(self, sid: int, header: dict[str, Any], tensors: list[Frame]) -> Message:
        """Session `sid`'s inference step (a worker "step" header), batched with the steps of
        other sessions waiting at the same time; the reply as `call` gives it. Cancel-safe like
        `call`: once sent, it is answered."""
        return await self._batcher.step(sid, header, tensors)

    def forget(self, sid: int) -> None:
        """Session `sid` ended (its steps are no longer waited for)."""
        self._batcher.forget(sid)

    @contextlib.asynccontextmanager
    async def _inference_turn(self) -> AsyncIterator[None]:
        self._batcher_waits = True
        try:
            await self._lock.acquire(INFERENCE)
        finally:
            self._batcher_waits = False
        try:
            yield
        finally:
            self._lock.release()

    async def _exchange_steps(self, messages: list[Message]) -> tuple[list[Message], list[int]]:
        """One "steps" request (the batcher holds the turn), as a single message each way:
        the compute pipe is read one message at a time (a reader may take bytes past its
        message), so steps are never written back to back. Shielded like `call`'s exchange."""
        header = {
            "op": "steps",
            "steps": [h for h, _ in messages],
            "counts": [len(t) for _, t in messages],
        }
        with trio.CancelScope(shield=True):
            stream = self._stream
            if stream is None:
                raise WorkerFailed("the compute process is not running")
            await write_message(stream, header, [f for _, t in messages for f in t])
            summary, frames = await read_message(stream, frames=True)
        for key in ("rss", "peak_rss"):
            if key in summary:
                self.info[key] = summary[key]
        replies, first = [], 0
        for reply, n in zip(summary["replies"], summary["counts"], strict=True):
            replies.append((reply, frames[first : first + n]))
            first += n
        return replies, list(summary.get("forwards", []))

    def queued(self) -> int:
        """Requests waiting for the device: calls, and steps not yet sent (the batcher's own
        place in the lock stands for those steps, so it is not counted again)."""
        return self._lock.queued() - self._batcher_waits + self._batcher.waiting()
