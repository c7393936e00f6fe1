"""The compute process behind `petald serve`: the priority lock serves inference before
training work and survives cancellation; a worker that cannot load says why."""

from __future__ import annotations

import pytest
import trio

from petald.server.executor import INFERENCE, TRAINING, Executor, PriorityLock, WorkerFailed


async def test_priority_lock_serves_lower_priority_first_then_arrival() -> None:
    lock = PriorityLock()
    order: list[str] = []
    await lock.acquire(TRAINING)  # held: everyone below queues

    async def waiter(name: str, priority: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await lock.acquire(priority)
        order.append(name)
        lock.release()

    async with trio.open_nursery() as nursery:
        await nursery.start(waiter, "train-1", TRAINING)
        await nursery.start(waiter, "train-2", TRAINING)
        await nursery.start(waiter, "step-1", INFERENCE)
        await nursery.start(waiter, "step-2", INFERENCE)
        await trio.testing.wait_all_tasks_blocked()
        assert lock.queued() == 4
        lock.release()
    assert order == ["step-1", "step-2", "train-1", "train-2"]


async def test_priority_lock_cancelled_waiter_leaves_the_queue() -> None:
    lock = PriorityLock()
    await lock.acquire(TRAINING)
    got: list[str] = []
    async with trio.open_nursery() as nursery:
        cancel = trio.CancelScope()

        async def cancelled() -> None:
            with cancel:
                await lock.acquire(INFERENCE)
                got.append("cancelled one")

        async def patient() -> None:
            await lock.acquire(TRAINING)
            got.append("patient")
            lock.release()

        nursery.start_soon(cancelled)
        nursery.start_soon(patient)
        await trio.testing.wait_all_tasks_blocked()
        cancel.cancel()
        await trio.testing.wait_all_tasks_blocked()
        lock.release()
    assert got == ["patient"]
    await lock.acquire(TRAINING)  # free again, at once


async def test_worker_that_cannot_load_fails_with_its_reason(tmp_path) -> None:
    executor = Executor({"source": str(tmp_path / "missing"), "blocks": [0, 1], "progress": False})
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            with pytest.raises(WorkerFailed, match="no such file or directory"):
                await nursery.start(executor.run)
