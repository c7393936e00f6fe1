"""`StepBatcher`: continuous batching on the daemon's side. Inference steps of all sessions wait
in one queue; one task (`run`, started by the executor) takes whatever is waiting when the
device's turn comes (`Executor.turn`: inference before forward/backward, as for single calls)
and sends it to the compute process as one "steps" request, which runs them as few forwards as
it can (petald.server.batched) and answers each step separately. A lone session therefore waits
for nothing: its step goes out as soon as the device is free.

Sessions stepping together tend to split into two alternating batches (the first reply goes out
while the others are still computing, that session's next step comes back alone...). So before
taking its turn the batcher waits, briefly, for the sessions of its last batch that have not
sent their next step yet: at most `gather_fraction` of that batch's compute time and never more
than `max_gather`; after one miss a session no longer counts (it may be idle between prompts).
`forwards` counts the forwards the compute process ran by sessions in each (`info`'s `served`).

Cancellation: a step cancelled while waiting leaves the queue; one already sent is answered by
the compute process anyway (the exchange is shielded, as `Executor.call`'s), and its session
learns it only when the answer is in. Entry point: `await batcher.step(sid, header, tensors)`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

import trio

from petald.errors import PetaldError
from petald.wire.frames import Frame
from petald.wire.messages import MAX_TENSORS

Message = tuple[dict[str, Any], list[Frame]]
# Steps in one request to the compute process: a batch's forward grows with it, and more than
# this would not share one well on most devices. (One message carries at most MAX_TENSORS
# tensors too: 24 one-tensor decode steps.)
MAX_BATCH_STEPS = 32


@dataclass(frozen=True)
class BatchConfig:
    """How the batcher gathers steps; `enabled=False` sends every step alone."""

    enabled: bool = True
    max_steps: int = MAX_BATCH_STEPS
    gather_fraction: float = 0.5  # of the last batch's compute time, waiting for its sessions
    max_gather: float = 0.05  # seconds, whatever that batch took

    def __post_init__(self) -> None:
        if not 0 < self.max_steps <= MAX_BATCH_STEPS:
            raise ValueError(f"max_steps must be 1..{MAX_BATCH_STEPS}")
        if self.gather_fraction < 0 or self.max_gather < 0:
            raise ValueError("gather_fraction and max_gather must be >= 0")


class BatcherStopped(PetaldError):
    """The batcher (and with it the compute process) stopped before the step was answered."""


@dataclass(eq=False)
class _Waiting:
    sid: int
    message: Message
    done: trio.Event = field(default_factory=trio.Event)
    taken: bool = False  # sent to the compute process: it will be answered
    reply: Message | None = None
    error: BaseException | None = None


# `exchange(messages)` -> (replies, sessions per forward); `turn()` holds the device.
Exchange = Callable[[list[Message]], Awaitable[tuple[list[Message], list[int]]]]
Turn = Callable[[], AbstractAsyncContextManager[None]]


class StepBatcher:
    def __init__(self, exchange: Exchange, turn: Turn, config: BatchConfig | None = None) -> None:
        self.config = config or BatchConfig()
        self._exchange = exchange
        self._turn = turn
        self._queue: list[_Waiting] = []
        self._changed = trio.Event()
        self._last: set[int] = set()  # sessions of the last batch sent
        self._last_time = 0.0  # seconds its exchange took
        self.forwards: Counter[int] = Counter()
        self.running = False

    async def step(self, sid: int, header: dict[str, Any], tensors: list[Frame]) -> Message:
        """The compute process's reply to session `sid`'s step, sent with whatever other
        steps are waiting. Raises BatcherStopped (or the exchange's error) if it stopped."""
        if not self.running:
            raise BatcherStopped("the compute process is not running")
        waiting = _Waiting(sid, (header, list(tensors)))
        self._queue.append(waiting)
        self._notify()
        try:
            await waiting.done.wait()
        finally:
            if not waiting.done.is_set():
                if waiting.taken:  # cancelled after it was sent: the answer is on its way
                    with trio.CancelScope(shield=True):
                        await waiting.done.wait()
                else:
                    self._queue.remove(waiting)
                    self._notify()
        if waiting.error is not None:
            raise waiting.error
        assert waiting.reply is not None
        return waiting.reply

    def waiting(self) -> int:
        """Steps waiting for their turn (not yet sent)."""
        return len(self._queue)

    def forget(self, sid: int) -> None:
        """Session `sid` ended: the next batch does not wait for it."""
        self._last.discard(sid)
        self._notify()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serves the queue until cancelled; steps still waiting then fail with
        BatcherStopped."""
        self.running = True
        task_status.started()
        try:
            while True:
                while not self._queue:
                    await self._wait_changed()
                await self._gather()
                async with self._turn():
                    batch = self._take()
                    for waiting in batch:
                        waiting.taken = True
                    if batch:
                        await self._send(batch)
        finally:
            self.running = False
            for waiting in self._queue:
                waiting.error = BatcherStopped("the compute process stopped")
                waiting.done.set()
            self._queue.clear()

    def _take(self) -> list[_Waiting]:
        """The steps of the next request, in arrival order: up to `max_steps`, and as many as
        fit in one message to the compute process (MAX_TENSORS)."""
        limit = self.config.max_steps if self.config.enabled else 1
        batch, tensors = [], 0
        while self._queue and len(batch) < limit:
            n = len(self._queue[0].message[1])
            if batch and tensors + n > MAX_TENSORS:
                break
            batch.append(self._queue.pop(0))
            tensors += n
        return batch

    async def _send(self, batch: list[_Waiting]) -> None:
        t0 = trio.current_time()
        try:
            replies, forwards = await self._exchange([w.message for w in batch])
        except BaseException as e:  # every member learns it; the batcher goes on
            for waiting in batch:
                waiting.error = e if isinstance(e, Exception) else BatcherStopped(str(e))
                waiting.done.set()
            if not isinstance(e, Exception):
                raise
            return
        self._last_time = trio.current_time() - t0
        self._last = {w.sid for w in batch}
        self.forwards.update(forwards)
        for waiting, reply in zip(batch, replies, strict=True):
            waiting.reply = reply
            waiting.done.set()

    async def _gather(self) -> None:
        """Waits (bounded) for the sessions of the last batch to be back in the queue."""
        if not self.config.enabled or len(self._last) < 2:
            return
        window = min(self.config.max_gather, self.config.gather_fraction * self._last_time)
        with trio.move_on_after(window):
            while len(self._queue) < self.config.max_steps:
                if self._last <= {w.sid for w in self._queue}:  # (forget() shrinks _last)
                    return
                await self._wait_changed()
        # Late ones are not waited for again until they are in a batch again.
        self._last &= {w.sid for w in self._queue}

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_changed(self) -> None:
        await self._changed.wait()
