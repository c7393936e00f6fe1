"""Where a server without `--blocks` should sit: `choose_span` picks the N consecutive blocks the
swarm serves least (by announced throughput), and `should_move` tells a running server whether
moving there would help the swarm enough to be worth draining its sessions. Pure functions of the
per-block throughput coverage (`SwarmView.coverage`), so they are tested without a network.

The rule for moving follows Petals' balance check: the swarm is as fast as its weakest block;
move when the weakest block's throughput after the move exceeds today's by more than
1 / `BALANCE_QUALITY`, so that servers do not chase each other over small differences."""

from __future__ import annotations

from petald.types import BlockRange

BALANCE_QUALITY = 0.75


def choose_span(coverage: list[float], n: int) -> BlockRange:
    """The `n` consecutive blocks whose weakest block has the least throughput (ties: the
    lowest total, then the first)."""
    if not 1 <= n <= len(coverage):
        raise ValueError(f"cannot place {n} blocks in a model of {len(coverage)}")
    best = min(
        range(len(coverage) - n + 1),
        key=lambda s: (min(coverage[s : s + n]), sum(coverage[s : s + n]), s),
    )
    return BlockRange(best, best + n)


def _with(coverage: list[float], span: BlockRange, throughput: float) -> list[float]:
    return [c + (throughput if b in span else 0.0) for b, c in enumerate(coverage)]


def should_move(others: list[float], current: BlockRange, throughput: float) -> BlockRange | None:
    """`others`: coverage without this server. Returns the span to move to, or None to stay."""
    target = choose_span(others, len(current))
    if target == current:
        return None
    now = min(_with(others, current, throughput))
    after = min(_with(others, target, throughput))
    if after <= now:
        return None
    return target if now < BALANCE_QUALITY * after else None
