"""Continuous batching, in process: the compute process's batched steps (petald.server.worker
`Compute.steps`, petald.server.batched) against the same sessions stepped one by one, and the
daemon's `StepBatcher` (petald.server.batching) on a stand-in exchange.

Checks: sessions of different lengths joining and leaving mid-batch, with speculative rollbacks,
give each session its alone outputs within 1e-5 (fp32), and really share forwards; a bad step is
refused alone; a batched forward that fails is retried member by member, and a member that fails
alone too fails alone; tuned sessions (client LoRA, deep prompts) never share a forward; a family
where batching is not exact falls back to steps alone; the batcher sends what waits when the
device frees up, waits for nothing when alone, drops cancelled steps and regroups sessions."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import trio
import trio.testing

from petald.server import batched, load_span
from petald.server.batching import BatchConfig, StepBatcher
from petald.server.worker import Compute

TOL = dict(rtol=1e-5, atol=1e-5)
# Rounds of (session, position, new tokens): sessions open when first named and close after
# their last step. B joins while A decodes, A leaves mid-way, D joins late; B and D roll back
# (a step at an earlier position, as speculative decoding does) with 2-token steps together.
SCHEDULE = [
    [("A", 0, 5)],
    [("A", 5, 1), ("B", 0, 2)],
    [("A", 6, 1), ("B", 2, 1), ("C", 0, 7)],
    [("A", 7, 1), ("B", 3, 1), ("C", 7, 1)],
    [("B", 4, 1), ("C", 8, 1), ("D", 0, 3)],
    [("B", 5, 2), ("C", 9, 1), ("D", 3, 2)],
    [("B", 6, 2), ("C", 10, 1), ("D", 4, 2)],
    [("B", 8, 1), ("C", 11, 1), ("D", 6, 1)],
]
SIDS = {"A": 1, "B": 2, "C": 3, "D": 4}


def _compute(path) -> Compute:
    return Compute(load_span(path, (0, 4), progress=False))


def _hidden(size: int, name: str, r: int, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 * SIDS[name] + r)
    return torch.randn(1, n, size, generator=gen)


def _step(name: str, position: int, hidden: torch.Tensor, **fields) -> tuple[dict, list]:
    return {"op": "step", "sid": SIDS[name], "position": position, **fields}, [hidden]


def _run_schedule(compute: Compute, size: int, *, together: bool) -> tuple[dict, list]:
    """Outputs by (session, round), and the forwards of each round (batched runs only)."""
    last = {name: r for r, steps in enumerate(SCHEDULE) for name, _, _ in steps}
    outs, forwards = {}, []
    for r, steps in enumerate(SCHEDULE):
        requests = []
        for name, position, n in steps:
            if position == 0:
                compute.handle({"op": "open", "sid": SIDS[name], "batch": 1, "max_length": 16,
                                "start": 0, "end": 4}, [])  # fmt: skip
            requests.append(_step(name, position, _hidden(size, name, r, n)))
        if together:
            replies, sizes = compute.steps(requests)
            forwards.append(sorted(sizes))
        else:
            replies = [compute.handle(h, t) for h, t in requests]
        for (name, position, n), (reply, out) in zip(steps, replies, strict=True):
            assert reply == {"ok": True, "position": position + n}, reply
            outs[name, r] = out[0]
            if last[name] == r:
                compute.handle({"op": "close", "sid": SIDS[name]}, [])
    return outs, forwards


@pytest.mark.parametrize("fam", ["llama", "mistral", "qwen2", "bloom"])
def test_sessions_joining_and_leaving_get_their_alone_outputs(fam, saved_model) -> None:
    """Catches: padding on the wrong side or not masked, positions of the padded index instead
    of the session's, split-back caches cut at the wrong place (later rounds differ), a rollback
    lost in a batch (B's and D's 2-token steps), and steps that never share a forward."""
    model, path = saved_model(fam)
    size = model.config.hidden_size
    want, _ = _run_schedule(_compute(path), size, together=False)
    got, forwards = _run_schedule(_compute(path), size, together=True)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], **TOL, msg=lambda m, k=key: f"{k}: {m}")
    assert forwards[3] == [3]  # A, B and C decode in one forward
    assert forwards[5] == [1, 2]  # B's and D's 2-token steps share one; C decodes alone


def test_a_bad_step_is_refused_alone_and_a_failing_forward_retried_alone(
    saved_model, monkeypatch
) -> None:
    """Catches: a bad request that fails the whole batch (or joins it), a batched forward whose
    failure reaches the other members, and a failed member whose cache keeps half a step."""
    model, path = saved_model("llama")
    size = model.config.hidden_size
    compute = _compute(path)
    for name in "ABC":
        compute.handle({"op": "open", "sid": SIDS[name], "batch": 1, "max_length": 16,
                        "start": 0, "end": 4}, [])  # fmt: skip
        compute.handle(*_step(name, 0, _hidden(size, name, 0, 2)))
    alone = _compute(path)
    for name in "AC":
        alone.handle({"op": "open", "sid": SIDS[name], "batch": 1, "max_length": 16,
                      "start": 0, "end": 4}, [])  # fmt: skip
        alone.handle(*_step(name, 0, _hidden(size, name, 0, 2)))
    want = {n: alone.handle(*_step(n, 2, _hidden(size, n, 1, 1)))[1][0] for n in "AC"}

    bad = _step("B", 5, _hidden(size, "B", 1, 1))  # past its 2 cached tokens
    replies, sizes = compute.steps([_step("A", 2, _hidden(size, "A", 1, 1)), bad,
                                    _step("C", 2, _hidden(size, "C", 1, 1))])  # fmt: skip
    assert replies[1][0]["error"] == "bad_input" and "past" in replies[1][0]["message"]
    assert sizes == [2]
    for i, name in ((0, "A"), (2, "C")):
        torch.testing.assert_close(replies[i][1][0], want[name], **TOL)
    assert compute.caches[SIDS["B"]].position == 2

    # The batched forward fails, and so does B's forward alone: A and C get their outputs.
    def fails(*_a, **_k):
        raise RuntimeError("device error")

    run_step = compute.span.run_step

    def b_fails(step, *a, **k):
        if step.cache is compute.caches[SIDS["B"]]:
            fails()
        return run_step(step, *a, **k)

    monkeypatch.setattr(batched, "step_batch", fails)
    monkeypatch.setattr(compute.span, "run_step", b_fails)
    for name in "AC":
        compute.caches[SIDS[name]].rollback(2)
    replies, sizes = compute.steps([_step(n, 2, _hidden(size, n, 1, 1)) for n in "ABC"])
    assert sizes == [1, 1, 1]
    assert "device error" in replies[1][0]["message"]
    assert compute.caches[SIDS["B"]].position == 2
    for i, name in ((0, "A"), (2, "C")):
        torch.testing.assert_close(replies[i][1][0], want[name], **TOL)


def test_tuned_sessions_never_share_a_forward(saved_model) -> None:
    """Catches: a step with client LoRA or deep prompts batched with others (its adapter would
    apply to their rows, or be dropped from its own)."""
    model, path = saved_model("llama")
    size = model.config.hidden_size
    gen = torch.Generator().manual_seed(3)
    lora = {"named": ["lora.self_attn.q_proj.A", "lora.self_attn.q_proj.B"]}
    a, b = torch.randn(4, 2, size, generator=gen), torch.randn(4, 64, 2, generator=gen)
    prompts = {"named": ["prompts"]}
    deep = torch.randn(4, 1, 2, size, generator=gen)
    tuned = {"A": (lora, [a, b]), "B": (prompts, [deep]), "C": ({}, []), "D": ({}, [])}

    def requests(r: int) -> list:
        out = []
        for name, (fields, extra) in tuned.items():
            header, tensors = _step(name, r, _hidden(size, name, r, 1), **fields)
            out.append((header, tensors + extra))
        return out

    computes = _compute(path), _compute(path)
    for compute in computes:
        for name in tuned:
            compute.handle({"op": "open", "sid": SIDS[name], "batch": 1, "max_length": 8,
                            "start": 0, "end": 4}, [])  # fmt: skip
    for r in range(3):
        want = [computes[0].handle(h, t) for h, t in requests(r)]
        got, sizes = computes[1].steps(requests(r))
        assert sorted(sizes) == [1, 1, 2]  # A alone, B alone, C and D together
        for (_, w), (reply, g) in zip(want, got, strict=True):
            assert reply["ok"]
            torch.testing.assert_close(g[0], w[0], **TOL)


def test_a_family_that_does_not_batch_exactly_falls_back_to_steps_alone(
    saved_model, monkeypatch
) -> None:
    """A family whose forward took positions from the cache index (padding included) instead of
    position_ids: the probe finds it, and every step runs alone with its exact output.
    Catches: a probe that passes it, and batching used although the probe refused it."""
    model, path = saved_model("llama")
    size = model.config.hidden_size
    computes = _compute(path), _compute(path)
    for c in computes:
        monkeypatch.setattr(c.span.runner, "run", _by_cache_index(c.span.runner.run))
    assert "differ" in (batched.batching_exact(computes[1].span) or "")
    want, _ = _run_schedule(computes[0], size, together=False)
    got, forwards = _run_schedule(computes[1], size, together=True)
    assert computes[1].unbatchable
    assert all(s == 1 for sizes in forwards for s in sizes)
    for key in want:
        torch.testing.assert_close(got[key], want[key], **TOL)


def _by_cache_index(run):
    def run_by_cache_index(hidden, start, end, *, position_ids, cache, **kw):
        past = cache.get_seq_length() if cache is not None else 0
        ids = torch.arange(past, past + hidden.shape[1])[None].expand(hidden.shape[0], -1)
        return run(hidden, start, end, position_ids=ids, cache=cache, **kw)

    return run_by_cache_index


# ---- the daemon's batcher, on a stand-in exchange ------------------------------------------


class _Device:
    """A stand-in compute process: each exchange takes `compute` seconds (or until `gate` is
    set) and answers every step with its session id; it records the batches it saw."""

    def __init__(self, compute: float = 1.0) -> None:
        self.compute = compute
        self.batches: list[list[int]] = []
        self.gate: trio.Event | None = None
        self.fail = False
        self._lock = trio.Lock()

    async def exchange(self, messages):
        sids = [h["sid"] for h, _ in messages]
        self.batches.append(sids)
        if self.gate is not None:
            await self.gate.wait()
        await trio.sleep(self.compute)
        if self.fail:
            raise RuntimeError("the compute process broke")
        return [({"ok": True, "sid": s}, []) for s in sids], [len(sids)]

    def turn(self):
        return self._lock


def _batcher(device: _Device, **config) -> StepBatcher:
    return StepBatcher(device.exchange, device.turn, BatchConfig(**config))


async def _send_step(batcher: StepBatcher, sid: int) -> int:
    reply, _ = await batcher.step(sid, {"sid": sid}, [])
    return reply["sid"]


async def test_batcher_alone_waits_for_nothing_and_regroups_sessions(autojump_clock) -> None:
    """Catches: a collection window that delays a lone session, answers handed to the wrong
    session, and sessions left to alternate between two half batches (no regrouping: the batch
    of a session that steps again at once would go out alone)."""
    device = _Device()
    batcher = _batcher(device)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        for _ in range(3):
            t0 = trio.current_time()
            assert await _send_step(batcher, 7) == 7
            assert trio.current_time() - t0 == device.compute  # no wait before it went out

        done: dict[int, list[int]] = {}

        async def session(sid: int) -> None:
            for _ in range(4):
                done.setdefault(sid, []).append(await _send_step(batcher, sid))
                await trio.sleep(0.01 * sid)  # the client's own turnaround

        async with trio.open_nursery() as clients:
            for sid in range(4):
                clients.start_soon(session, sid)
        nursery.cancel_scope.cancel()
    assert done == {sid: [sid] * 4 for sid in range(4)}
    assert [sorted(b) for b in device.batches[3:]][-3:] == [[0, 1, 2, 3]] * 3
    assert batcher.forwards == Counter(len(b) for b in device.batches)


async def test_batcher_drops_cancelled_steps_and_isolates_failures(autojump_clock) -> None:
    """Catches: a step cancelled while waiting still sent (or its cancellation failing the
    others), a step cancelled after it was sent left without its answer being awaited, and an
    exchange error that stops the batcher for later steps."""
    device = _Device()
    batcher = _batcher(device)
    results: dict[int, object] = {}

    async def run(sid: int, scope: trio.CancelScope | None = None) -> None:
        with scope or trio.CancelScope():
            results[sid] = await _send_step(batcher, sid)
            return
        results[sid] = "cancelled"

    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        device.gate = trio.Event()
        sent, waiting = trio.CancelScope(), trio.CancelScope()
        nursery.start_soon(run, 1, sent)  # goes out at once and holds the device at the gate
        await trio.testing.wait_all_tasks_blocked()
        for sid, scope in ((2, None), (3, waiting), (4, None)):
            nursery.start_soon(run, sid, scope)
        await trio.testing.wait_all_tasks_blocked()
        sent.cancel()  # already sent: answered all the same, then cancelled
        waiting.cancel()  # still waiting: leaves the queue
        await trio.testing.wait_all_tasks_blocked()
        assert batcher.waiting() == 2
        assert 1 not in results  # waits for the answer to what it sent
        device.gate.set()
        device.gate = None
        await trio.testing.wait_all_tasks_blocked()
        while len(results) < 4:
            await trio.sleep(device.compute)
        assert [sorted(b) for b in device.batches] == [[1], [2, 4]]
        assert results == {1: "cancelled", 2: 2, 3: "cancelled", 4: 4}

        device.fail = True
        with pytest.raises(RuntimeError, match="broke"):
            await _send_step(batcher, 5)
        device.fail = False
        assert await _send_step(batcher, 6) == 6
        nursery.cancel_scope.cancel()
