"""Placement: a new server takes the blocks the swarm serves least, and a running one moves only
when that clearly lifts the swarm's weakest block."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from petald.server.placement import BALANCE_QUALITY, choose_span, should_move
from petald.types import BlockRange


def test_choose_span_takes_the_gap() -> None:
    assert choose_span([5.0, 5.0, 0.0, 0.0, 5.0, 5.0], 2) == BlockRange(2, 4)
    assert choose_span([0.0] * 6, 3) == BlockRange(0, 3)  # empty swarm: from the start
    assert choose_span([3.0, 9.0, 9.0, 2.0, 2.0, 9.0], 2) == BlockRange(3, 5)  # ties: least total


def test_choose_span_refuses_impossible_sizes() -> None:
    with pytest.raises(ValueError, match="cannot place"):
        choose_span([1.0, 1.0], 3)
    with pytest.raises(ValueError, match="cannot place"):
        choose_span([1.0, 1.0], 0)


def test_should_move_when_blocks_are_unserved() -> None:
    # Blocks 4:6 nobody serves; we sit on 0:2 next to another server.
    others = [10.0, 10.0, 10.0, 10.0, 0.0, 0.0]
    assert should_move(others, BlockRange(0, 2), 10.0) == BlockRange(4, 6)


def test_should_stay_when_balanced_or_gain_is_small() -> None:
    assert should_move([10.0, 10.0, 0.0, 0.0], BlockRange(2, 4), 10.0) is None  # we fill the gap
    # Moving to 0:2 would lift the weakest block from 8 to 10: 8/10 >= BALANCE_QUALITY, stay.
    assert BALANCE_QUALITY <= 8.0 / 10.0
    assert should_move([8.0, 8.0, 10.0, 10.0], BlockRange(2, 4), 2.0) is None
    # From 2 to 12: move.
    assert should_move([2.0, 2.0, 10.0, 10.0], BlockRange(2, 4), 10.0) == BlockRange(0, 2)


@given(
    st.lists(st.floats(0.0, 100.0), min_size=2, max_size=24),
    st.integers(1, 24),
    st.floats(0.1, 100.0),
)
def test_a_move_never_lowers_the_weakest_block(others, n, throughput) -> None:
    n = min(n, len(others))
    current = BlockRange(0, n)
    target = should_move(others, current, throughput)
    if target is None:
        return
    assert len(target) == n and target.start >= 0 and target.end <= len(others)

    def weakest(span: BlockRange) -> float:
        return min(c + (throughput if b in span else 0.0) for b, c in enumerate(others))

    assert weakest(target) > weakest(current)
