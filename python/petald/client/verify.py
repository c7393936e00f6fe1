"""Verified computation: an `InferenceSession` re-runs a sampled fraction of its steps
(`ClientConfig.verify_fraction`, drawn from `verify_seed`) on a second, independent route
through each hop's blocks, or on a local reference (`InferenceSession.reference`), and
compares the outputs (`tolerance`). Entry point: `Verifier`, one per session.

How a check runs: the second route (a "witness": servers other than the hop's, planned like
any route) keeps a session of its own, brought up to date from the client's history of the
hop's inputs (petald.client.history) in one multi-token step that ends with the checked step's
input. If the two outputs differ beyond the tolerance, a third opinion decides: the local
reference if there is one, else a third route avoiding both. The side the third opinion
contradicts is banned for `BAN_SECONDS` and reported (`SessionStats.verify_detections`, a
warning); when that is the hop's own server, the session replays its part elsewhere, rebuilds
the later hops' caches from the corrected outputs and redoes the step, so the step's output is
the honest one. With no third opinion (no other server holds the blocks) the check cannot say
who is wrong: it warns, counts `verify_unresolved` and keeps the hop's server. A hop whose blocks
no other server holds is not checked (`verify_skipped`, warned once).

Tolerance: K * eps * max|output| * sqrt(blocks), eps the coarsest of both sides' dtypes
(float32 2^-16, see EPS; float16 2^-10, bfloat16 2^-7) and quantizations (int8 2^-7, nf4
2^-4), K `ClientConfig.verify_k` (8). Rounding grows with depth like a random walk (hence
sqrt(blocks)) and scales with the activations' magnitude. Measured (a prefill against the same
tokens step by step; K needed = diff / (eps * max * sqrt(blocks))): SmolLM2's 30 blocks 0.27 in
float32 and 1.5 in bfloat16, a tiny random Llama's 6 blocks 0.005 and 0.25; one block of
the tiny model perturbed by 1 % moves its outputs by ~1 % of their max, ~40x the float32
tolerance. In bfloat16 (or quantized) the tolerance is a few % of the max output: only errors
well above the dtype's own rounding are caught (a zeroed or garbage block, another checkpoint),
not a 1 % perturbation, which is the size of bfloat16's rounding itself."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import trio

from petald.client.rpc import is_server_failure
from petald.errors import BadReply, PetaldError, RoutingError
from petald.types import BlockRange

if TYPE_CHECKING:
    from petald.client.session import InferenceSession, _Link

log = logging.getLogger(__name__)

# A server caught computing wrong outputs is left out for a day (the bans' usual cap, 300 s,
# is for servers that fail, which come back).
BAN_SECONDS = 24 * 3600.0
# Not float32's unit roundoff (2^-23): a prefill and token-by-token steps sum long dot products
# in other orders, and SmolLM2's 30 blocks in float32 differ by 0.084 on a max of 3667 (an
# outlier channel), 35 x 2^-23 * max * sqrt(30); 2^-16 gives room to spare.
EPS = {"float32": 2.0**-16, "float16": 2.0**-10, "bfloat16": 2.0**-7}
QUANT_EPS = {"none": 0.0, "int8": 2.0**-7, "nf4": 2.0**-4}
LOCAL = "local reference"

# (blocks, inputs of every token so far (batch, length, hidden), mask (batch, length) | None,
# position ids (batch, length) | None) -> the blocks' outputs (batch, length, hidden).
Reference = Callable[[BlockRange, torch.Tensor, Any, Any], torch.Tensor]


def tolerance(
    reference_max: float, blocks: int, dtypes: Iterable[str], quants: Iterable[str], k: float
) -> float:
    """The largest difference two honest computations of `blocks` blocks may show."""
    eps = max(
        [EPS.get(d, EPS["bfloat16"]) for d in dtypes] + [QUANT_EPS.get(q, 2.0**-4) for q in quants]
    )
    return k * eps * reference_max * math.sqrt(blocks)


@dataclass(frozen=True)
class Opinion:
    output: torch.Tensor  # (batch, n, hidden): the checked step's tokens
    peers: tuple[str, ...]  # who computed it (LOCAL for the reference)


@dataclass(frozen=True)
class Detection:
    peer: str
    blocks: BlockRange
    step: int  # the session's step (1-based) whose check caught it
    position: int
    max_diff: float
    tolerance: float


@dataclass
class _Witness:
    links: list[_Link]
    position: int = 0  # tokens its servers' caches hold

    @property
    def peers(self) -> tuple[str, ...]:
        return tuple(link.hop.peer_id for link in self.links)


class Verifier:
    def __init__(self, session: InferenceSession) -> None:
        config = session.client.config
        self.session = session
        self.fraction, self.k = config.verify_fraction, config.verify_k
        self.rng = random.Random(config.verify_seed)
        self.reference: Reference | None = None
        self.witnesses: dict[BlockRange, _Witness] = {}
        self._warned: set[BlockRange] = set()

    def sample(self) -> bool:
        """Whether to check this step (one draw per step: the seed fixes which)."""
        return self.fraction > 0 and self.rng.random() < self.fraction

    def rollback(self, position: int) -> None:
        """The session forgot tokens from `position` (or reordered them: 0): witnesses' caches
        are rolled back too, by their next catch-up step."""
        for w in self.witnesses.values():
            w.position = min(w.position, position)

    def invalidate_after(self, boundary: int) -> None:
        """Inputs at and after `boundary` were corrected: witnesses there start over."""
        for blocks, w in self.witnesses.items():
            if blocks.start >= boundary:
                w.position = 0

    async def close(self) -> None:
        witnesses, self.witnesses = list(self.witnesses.values()), {}
        for w in witnesses:
            await self.session._close_links(w.links)

    async def check(
        self,
        pos: int,
        inputs: dict[int, torch.Tensor],
        outputs: dict[int, torch.Tensor],
        mask,
        positions,
    ) -> tuple[int, BadReply] | None:
        """Checks every hop of this step (inputs by boundary, outputs by link identity); the
        index of the first hop whose server was found wrong (and banned), with why."""
        for i, link in enumerate(self.session._links):
            x, y = inputs[link.hop.blocks.start], outputs[id(link)]
            error = await self._check_hop(link, pos, x, y, mask, positions)
            if error is not None:
                return i, error
        return None

    async def _check_hop(self, link: _Link, pos, x, y, mask, positions) -> BadReply | None:
        stats, hop = self.session.stats, link.hop
        second = await self._opinion(hop.blocks, pos, x, mask, positions, {hop.peer_id}, keep=True)
        if second is None:
            stats.verify_skipped += 1
            if hop.blocks not in self._warned:
                self._warned.add(hop.blocks)
                log.warning("verification: no other server holds blocks %s; unchecked", hop.blocks)
            return None
        stats.verify_checks += 1
        primary = Opinion(y, (hop.peer_id,))
        ok, diff, tol = self._agree(primary, second, hop.blocks)
        if ok:
            return None
        stats.verify_mismatches += 1
        if LOCAL in second.peers:
            judge: Opinion | None = second
        else:
            exclude = {hop.peer_id, *second.peers}
            judge = await self._opinion(hop.blocks, pos, x, mask, positions, exclude, keep=False)
        if judge is not None and judge is not second:
            with_second = self._agree(judge, second, hop.blocks)[0]
            with_primary = self._agree(judge, primary, hop.blocks)[0]
            if with_primary and not with_second:  # the witness was wrong
                for peer in second.peers:
                    self._convict(peer, hop.blocks, pos, diff, tol, [hop.peer_id, *judge.peers])
                await self._drop(hop.blocks)
                return None
            if not (with_second and not with_primary):
                judge = None
        if judge is None:
            stats.verify_unresolved += 1
            log.warning(
                "verification: %s and %s disagree on blocks %s at position %d (max diff %.3g > "
                "tolerance %.3g) and no third opinion decides; keeping %s",
                hop.peer_id,
                ", ".join(second.peers),
                hop.blocks,
                pos,
                diff,
                tol,
                hop.peer_id,
            )
            return None
        return self._convict(hop.peer_id, hop.blocks, pos, diff, tol, [*second.peers, *judge.peers])

    def _convict(self, peer, blocks, pos, diff, tol, agreeing: list[str]) -> BadReply:
        s = self.session
        others = ", ".join(dict.fromkeys(agreeing))
        why = f"outputs of blocks {blocks} differ from {others}'s by {diff:.3g} (tol {tol:.3g})"
        error = BadReply(peer, why)
        s.stats.verify_detections.append(Detection(peer, blocks, s.stats.steps + 1, pos, diff, tol))
        log.warning(
            "verification: server %s computed wrong outputs for blocks %s at position %d (max "
            "diff %.3g > tolerance %.3g; %s agree); banned for %.0f h",
            peer,
            blocks,
            pos,
            diff,
            tol,
            others,
            BAN_SECONDS / 3600,
        )
        s.client.ban(peer, error, hard=BAN_SECONDS)
        return error

    def _agree(self, a: Opinion, b: Opinion, blocks: BlockRange) -> tuple[bool, float, float]:
        """Whether two opinions agree within the tolerance; (verdict, max diff, tolerance)."""
        x, y = a.output.float(), b.output.float()
        if x.shape != y.shape:
            return False, math.inf, 0.0
        diff = float((x - y).abs().max())
        scale = max(float(x.abs().max()), float(y.abs().max()))
        dtypes, quants = [], []
        for peer in (*a.peers, *b.peers):
            entry = self.session.client.view.get(peer) if peer != LOCAL else None
            if entry is not None:
                dtypes.append(entry.info.dtype)
                quants.append(entry.info.quant)
        tol = tolerance(scale, len(blocks), dtypes or ["float32"], quants, self.k)
        return math.isfinite(diff) and diff <= tol, diff, tol

    async def _drop(self, blocks: BlockRange) -> None:
        w = self.witnesses.pop(blocks, None)
        if w is not None:
            await self.session._close_links(w.links)

    async def _opinion(
        self, blocks: BlockRange, pos: int, x, mask, positions, exclude: set[str], *, keep: bool
    ) -> Opinion | None:
        """This step's output of `blocks` from the reference or a route avoiding `exclude`
        (kept for later checks with `keep`); None if there is none."""
        s, n = self.session, x.shape[1]
        if self.reference is not None and keep:
            past = s._history.get(blocks.start)[:, :pos] if pos else x[:, :0]
            full = torch.cat([past, x], 1)
            out = await trio.to_thread.run_sync(self.reference, blocks, full, mask, positions)
            return Opinion(out[:, -n:], (LOCAL,))
        w = self.witnesses.get(blocks) if keep else None
        banned = s.client.banned()
        if w is not None and (
            set(w.peers) & (exclude | banned) or any(link.stream.closed for link in w.links)
        ):
            await self._drop(blocks)
            w = None
        if w is None:
            try:
                w = _Witness(await s._open(blocks, exclude=frozenset(exclude)))
            except RoutingError:
                return None
            if keep:
                self.witnesses[blocks] = w
        try:
            out = await self._catch_up(w, blocks, pos, x, mask, positions)
        except PetaldError as e:  # the check is lost, never the user's step
            if is_server_failure(e):
                s.client.ban(getattr(e, "peer", "") or w.peers[0], e)
            log.warning("verification: the check of blocks %s failed: %s", blocks, e)
            await self._drop(blocks) if keep else await s._close_links(w.links)
            return None
        if not keep:
            await s._close_links(w.links)
        return Opinion(out[:, -n:], w.peers)

    async def _catch_up(self, w: _Witness, blocks, pos: int, x, mask, positions) -> torch.Tensor:
        """One step through the witness's servers: the session's inputs since their caches'
        end, then this step's; returns the outputs of all those tokens."""
        s = self.session
        start = min(w.position, pos)
        if start < pos:
            x = torch.cat([s._history.get(blocks.start)[:, start:pos], x], 1)
        for link in w.links:
            x = await link.stream.step(
                s._next_id(),
                start,
                x,
                mask=mask,
                positions=positions[:, start:] if positions is not None else None,
                tuning=s._tuning_for(link.hop.blocks, start),
            )
        w.position = start + x.shape[1]
        return x
