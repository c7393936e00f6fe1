"""`History` (the session's failover record) against concatenation, the plain way to keep it:
the same tensors after any sequence of appends, truncations and reorders; and a 4k-token
session's memory and copies stay linear in its length."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from petald.client.history import MIN_CAPACITY, History

BATCH, HIDDEN = 2, 3

ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 40)),
        st.tuples(st.just("truncate"), st.floats(0, 1)),
        st.tuples(st.just("reorder"), st.permutations(range(BATCH))),
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_history_equals_concatenation(script) -> None:
    """Catches: an append that writes at the wrong offset or loses the old tokens on growth,
    a truncate that keeps stale tokens, a reorder of the buffer's unused tail only."""
    history, plain = History(), {0: torch.empty(BATCH, 0, HIDDEN), 5: torch.empty(BATCH, 0, HIDDEN)}
    counter = 0
    for op, arg in script:
        if op == "append":
            step = {}
            for b in plain:
                step[b] = torch.arange(counter, counter + BATCH * arg * HIDDEN, dtype=torch.float32)
                step[b] = step[b].reshape(BATCH, arg, HIDDEN)
                counter += BATCH * arg * HIDDEN
                plain[b] = torch.cat([plain[b], step[b]], 1)
            history.append(step)
        elif op == "truncate":
            keep = int(arg * history.length)
            history.truncate(keep)
            plain = {b: h[:, :keep] for b, h in plain.items()}
        else:
            index = torch.tensor(arg)
            history.reorder(index)
            plain = {b: h.index_select(0, index) for b, h in plain.items()}
        assert history.length == plain[0].shape[1]
        for b, h in plain.items():
            if history.length:
                assert torch.equal(history.get(b), h)


def test_a_4k_token_session_is_linear_in_memory_and_copies() -> None:
    """4096 one-token steps at three boundaries: the buffers hold at most twice the tokens, and
    are reallocated log2(4096 / MIN_CAPACITY) + 1 times, not once per step (concatenation)."""
    history = History()
    tokens, hidden = 4096, 576
    reallocations, last = 0, None
    for t in range(tokens):
        x = torch.full((1, 1, hidden), float(t))
        history.append({0: x, 10: x + 1, 20: x + 2})
        buf = history._buffers[0]
        if buf is not last:
            reallocations, last = reallocations + 1, buf
    per_token = 3 * hidden * 4
    assert history.nbytes() <= 2 * tokens * per_token
    assert reallocations <= (tokens // MIN_CAPACITY).bit_length()
    assert torch.equal(history.get(20)[0, :, 0], torch.arange(tokens, dtype=torch.float32) + 2)


def test_a_new_boundary_must_hold_every_token() -> None:
    history = History()
    history.append({0: torch.zeros(1, 3, 2)})
    history.set(7, torch.ones(1, 3, 2))
    assert torch.equal(history.get(7), torch.ones(1, 3, 2))
    with pytest.raises(ValueError, match="the history has 3"):
        history.set(9, torch.ones(1, 2, 2))
