"""The hostile-peer campaign against a live daemon (issue 10 item 3): `draw_corpus` draws
`Exchange`s (petald.testing.fuzz_messages) with hypothesis, derandomized so that CI sends the
same bytes every run, and multiplies each into mutants (flipped bytes, truncations, repeated
messages: hypothesis draws ~0.02-0.1 s per structured example on a loaded CI machine, a mutant
costs microseconds, so 10,000 messages fit CI's time). `run_campaign` sends them from a real
py-libp2p peer over many concurrent streams, recording how each ended: an answer then a close,
a reset, a refusal at protocol negotiation — or nothing within the bound, a hang.
`rss_bytes(pid)` reads a process's resident memory from /proc, for the memory bound, and
`loads_torch(pid)` whether it has torch mapped (the daemon of `petald serve` must not).

Entry points: `draw_corpus(...)`, then `await run_campaign(open_stream, corpus, ...)` -> `Report`;
tests/swarm/test_fuzz.py runs it while an honest session generates on the same daemon, and
`just fuzz` runs it six times larger (PETALD_FUZZ_SCALE=6: 10,000+ messages)."""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from hypothesis import HealthCheck, Phase, given, settings
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from petald.testing.fuzz_messages import PROTOCOLS, Exchange, exchanges

OpenStream = Callable[[str], Awaitable[Any]]


def scale() -> int:
    """How many times the CI corpus `just fuzz` sends (PETALD_FUZZ_SCALE, default 1)."""
    value = os.environ.get("PETALD_FUZZ_SCALE", "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"PETALD_FUZZ_SCALE must be a positive integer, not {value!r}")
    return int(value)


def draw_corpus(
    n: int, *, hidden: int, model: str, keys: list[KeyPair], seed: int = 0
) -> list[Exchange]:
    """About `n` exchanges drawn by hypothesis, the same number of each protocol (drawn over
    all protocols at once, a small `n` left some out). Derandomized (the seed picks the
    sequence): the same inputs every run, so a failure in CI replays locally."""
    out: list[Exchange] = []
    per_kind = -(-n // len(PROTOCOLS))
    for kind in sorted(PROTOCOLS):

        @settings(
            max_examples=per_kind,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(exchanges(hidden, model, keys, kind=kind))
        def collect(exchange: Exchange) -> None:
            out.append(exchange)

        collect._hypothesis_internal_use_seed = seed  # type: ignore[attr-defined]
        collect()
    return out


def mutants(corpus: list[Exchange], copies: int, *, seed: int = 0) -> list[Exchange]:
    """Each exchange, then `copies - 1` mutants of it (seeded: the same every run): each
    message kept, a byte flipped, truncated, or sent twice."""
    rng = random.Random(seed)
    out: list[Exchange] = []
    for exchange in corpus:
        out.append(exchange)
        for _ in range(copies - 1):
            messages: list[bytes] = []
            for m in exchange.messages:
                how = rng.randrange(4)
                if how == 1 and m:
                    i = rng.randrange(len(m))
                    m = m[:i] + bytes([m[i] ^ (1 << rng.randrange(8))]) + m[i + 1 :]
                elif how == 2:
                    m = m[: rng.randrange(len(m) + 1)]
                elif how == 3:
                    messages.append(m)
                messages.append(m)
            out.append(Exchange(exchange.kind, tuple(messages), exchange.end))
    rng.shuffle(out)  # protocols interleaved, as a hostile peer would
    return out


class Attacker:
    """A hostile peer's side: `open_stream(protocol)` to the target on `host`. The daemon may
    drop the whole connection of a peer that misbehaves (py-libp2p's pubsub does, on garbage):
    then the attacker dials again, as a real one would, once per failed open (`reconnects`)."""

    def __init__(self, host: IHost, target: str) -> None:
        self.host = host
        self.target = info_from_p2p_addr(Multiaddr(target))
        self.reconnects = 0
        self._lock = trio.Lock()

    async def open_stream(self, protocol: str) -> Any:
        peer: ID = self.target.peer_id
        try:
            return await self.host.new_stream(peer, [protocol])
        except Exception:
            async with self._lock:  # one redial for every worker that saw the connection go
                try:
                    return await self.host.new_stream(peer, [protocol])
                except Exception:
                    self.reconnects += 1
                    await self.host.disconnect(peer)
                    await self.host.connect(self.target)
            return await self.host.new_stream(peer, [protocol])


@dataclass
class Outcome:
    exchange: Exchange
    ended: str  # "closed" (answered or not, then closed), "reset", "refused", "cut", "hang"
    seconds: float
    answer_bytes: int = 0
    error: str = ""  # what the read or the stream's opening raised


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)

    def messages(self) -> Counter[str]:
        """Adversarial messages sent, by protocol kind."""
        out: Counter[str] = Counter()
        for o in self.outcomes:
            if o.ended != "refused":
                out[o.exchange.kind] += len(o.exchange.messages)
        return out

    def ended(self) -> Counter[tuple[str, str]]:
        return Counter((o.exchange.kind, o.ended) for o in self.outcomes)

    def hangs(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.ended == "hang"]

    def slowest(self) -> Outcome | None:
        return max(self.outcomes, key=lambda o: o.seconds, default=None)

    def summary(self) -> str:
        lines = [f"{'protocol':<14} {'messages':>8}  how the exchanges ended"]
        ended = self.ended()
        for kind, n in sorted(self.messages().items()):
            how = ", ".join(f"{e} {c}" for (k, e), c in sorted(ended.items()) if k == kind)
            lines.append(f"{kind:<14} {n:>8}  {how}")
        lines.append(f"{'total':<14} {sum(self.messages().values()):>8}")
        return "\n".join(lines)


async def run_exchange(open_stream: OpenStream, exchange: Exchange, *, bound: float) -> Outcome:
    """Sends one exchange and reads until the daemon closes or resets the stream; "hang" when
    neither happened within `bound` seconds."""
    t0 = time.monotonic()
    got = 0
    ended, error = "hang", ""
    with trio.move_on_after(bound):
        try:
            stream = await open_stream(exchange.protocol)
        except Exception as e:  # refused at negotiation (e.g. a per-peer stream limit)
            return Outcome(exchange, "refused", time.monotonic() - t0, error=repr(e))
        try:
            if exchange.end == "cut":  # write, reset: nothing to wait for
                await _write_all(stream, exchange)
                return Outcome(exchange, "cut", time.monotonic() - t0)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_write_all, stream, exchange)
                while True:  # the answer, read concurrently: it may be large
                    piece = await stream.read(65536)
                    if not piece:
                        break
                    got += len(piece)
            ended = "closed"
        except BaseException as e:
            leaves = _leaves(e)
            if any(isinstance(x, trio.Cancelled) for x in leaves):
                raise  # our bound: the move_on_after below catches it
            ended = "cut" if exchange.end == "cut" else _how_it_ended(leaves)
            error = repr(e)
        finally:
            # The daemon may have reset it already.
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(1),
                contextlib.suppress(Exception),
            ):
                await stream.reset()
    return Outcome(exchange, ended, time.monotonic() - t0, got, error)


def _leaves(e: BaseException) -> list[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        return [leaf for x in e.exceptions for leaf in _leaves(x)]
    return [e]


def _how_it_ended(leaves: list[BaseException]) -> str:
    """py-libp2p raises StreamEOF at the end of a stream the other side closed (an EOFError),
    StreamReset when it reset it."""
    return "closed" if all(isinstance(x, EOFError) for x in leaves) else "reset"


async def _write_all(stream: Any, exchange: Exchange) -> None:
    try:
        for message in exchange.messages:
            await stream.write(message)
        if exchange.end == "cut":
            await stream.reset()
        else:
            await stream.close()  # half-close: the daemon sees the end of our side
    except Exception:  # the daemon reset the stream before we finished: that is an answer
        pass


async def run_campaign(
    open_stream: OpenStream, corpus: list[Exchange], *, workers: int = 8, bound: float = 30.0
) -> Report:
    """Sends every exchange of `corpus`, `workers` streams at a time."""
    report = Report()
    send, receive = trio.open_memory_channel[Exchange](len(corpus))
    for exchange in corpus:
        send.send_nowait(exchange)
    send.close()

    async def worker() -> None:
        async for exchange in receive:
            report.outcomes.append(await run_exchange(open_stream, exchange, bound=bound))

    async with trio.open_nursery() as nursery:
        for _ in range(workers):
            nursery.start_soon(worker)
    return report


def rss_bytes(pid: int) -> int:
    """Resident memory of process `pid` (VmRSS in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for pid {pid}")


def loads_torch(pid: int) -> bool:
    """Whether process `pid` has torch's library mapped: importing it costs the daemon of
    `petald serve` ~500 MiB, so only its compute process may (petald.server.worker)."""
    with open(f"/proc/{pid}/maps") as f:
        return any("libtorch" in line for line in f)
