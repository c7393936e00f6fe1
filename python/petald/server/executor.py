"""`Executor`: the daemon's handle on its compute process (petald.server.worker). It starts the
process, waits until the span is loaded, then passes it one request at a time — inference steps
before forward/backward work (`PriorityLock`), since a chat user waits on every step while a
training batch is throughput work. A compute process that dies takes the daemon down with a clear
message; a daemon that dies takes the compute process with it (a lifeline pipe, see the worker).

Entry point: `info = await nursery.start(executor.run)`, then `await executor.call(header, tensors,
priority=...)`."""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
from typing import Any

import trio

from petald.errors import PetaldError
from petald.server.openmp import with_openmp_defaults
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
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.info: dict[str, Any] = {}
        self._lock = PriorityLock()
        self._stream: TrioByteStream | None = None
        self._stopping = False

    async def run(self, *, task_status: trio.TaskStatus[dict[str, Any]]) -> None:
        """Starts the compute process and serves until cancelled; started(info) once loaded."""
        ours, theirs = socket.socketpair()
        # The lifeline: we hold the write end (never inherited by anyone) until we die.
        lifeline_r, lifeline_w = os.pipe()
        argv = [sys.executable, "-m", "petald.server.worker", str(theirs.fileno())]
        try:
            proc = await trio.lowlevel.open_process(
                [*argv, json.dumps(self.spec), str(lifeline_r)],
                pass_fds=(theirs.fileno(), lifeline_r),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # stdout is the daemon's JSON channel; logs: stderr
                env=worker_env(),
            )
        finally:
            theirs.close()
            os.close(lifeline_r)
        stream = TrioByteStream(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
        try:
            try:
                header, _ = await read_message(stream, max_tensor_bytes=0)
            except PetaldError:
                code = await proc.wait()
                raise WorkerFailed(f"the compute process exited ({code}) while loading") from None
            if "error" in header:
                raise WorkerFailed(f"loading failed: {header['error']}: {header.get('message')}")
            self.info = header
            self._stream = stream
            task_status.started(header)
            code = await proc.wait()
            raise WorkerFailed(f"the compute process exited unexpectedly ({code})")
        finally:
            self._stream = None
            with trio.CancelScope(shield=True):
                await stream.aclose()
                if proc.returncode is None:
                    proc.kill()
                    with trio.move_on_after(10):
                        await proc.wait()
                os.close(lifeline_w)

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

    def queued(self) -> int:
        return self._lock.queued()
