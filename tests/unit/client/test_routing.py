"""RoutePlanner and PeerBans, without a network: routes cover [start, end) exactly through
usable servers (a property over random swarms), inference picks the cheapest chain, and a gap
is a RoutingError naming the missing blocks."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from petald.client.routing import Hop, PeerBans, RoutePlanner, RoutingPolicy, missing_blocks
from petald.errors import RoutingError
from petald.p2p.swarm_view import ServerEntry
from petald.types import BlockRange, ServerInfo

N = 12


def server(
    peer: str,
    start: int,
    end: int,
    *,
    state: str = "online",
    tput: float = 100.0,
    cache: int = 10**6,
) -> ServerEntry:
    info = ServerInfo(
        model="m",
        blocks=BlockRange(start, end),
        n_blocks=N,
        state=state,  # type: ignore[arg-type]
        throughput=tput,
        cache_tokens_free=cache,
    )
    return ServerEntry(peer, info, published_at=0.0, expires_at=100.0, source="gossip")


@st.composite
def swarms(draw: st.DrawFn) -> tuple[list[ServerEntry], BlockRange, set[str], RoutingPolicy]:
    entries = []
    for i in range(draw(st.integers(0, 10))):
        a = draw(st.integers(0, N - 1))
        b = draw(st.integers(a + 1, N))
        state = draw(st.sampled_from(["online", "online", "joining", "draining"]))
        tput = draw(st.sampled_from([0.0, 1.0, 50.0, 1000.0]))
        cache = draw(st.integers(0, 99))
        entries.append(server(f"p{i}", a, b, state=state, tput=tput, cache=cache))
    start = draw(st.integers(0, N - 1))
    wanted = BlockRange(start, draw(st.integers(start + 1, N)))
    peers = [e.peer_id for e in entries]
    banned = set(draw(st.lists(st.sampled_from(peers), max_size=3))) if peers else set()
    deny = frozenset(draw(st.lists(st.sampled_from(peers), max_size=2))) if peers else frozenset()
    allow = None
    if peers and draw(st.booleans()):
        allow = frozenset(draw(st.lists(st.sampled_from(peers), min_size=1)))
    return entries, wanted, banned, RoutingPolicy(allow=allow, deny=deny)


def usable(e: ServerEntry, banned: set[str], policy: RoutingPolicy) -> bool:
    return (
        e.info.state == "online"
        and e.peer_id not in banned
        and e.peer_id not in policy.deny
        and (policy.allow is None or e.peer_id in policy.allow)
    )


def check_route(route: list[Hop], entries, wanted, banned, policy) -> None:
    by_peer = {e.peer_id: e for e in entries}
    assert route and route[0].blocks.start == wanted.start and route[-1].blocks.end == wanted.end
    for hop, nxt in itertools.pairwise(route):
        assert hop.blocks.end == nxt.blocks.start  # contiguous, no overlap
    for hop in route:
        e = by_peer[hop.peer_id]
        assert usable(e, banned, policy)
        span = e.info.blocks
        assert span.start <= hop.blocks.start < hop.blocks.end <= span.end


@settings(max_examples=300, deadline=None)
@given(swarms(), st.integers(0, 2**32), st.sampled_from(["inference", "forward"]))
def test_route_covers_the_range_through_usable_servers_or_names_the_gap(case, seed, kind) -> None:
    entries, wanted, banned, policy = case
    planner = RoutePlanner(policy, random.Random(seed))
    ok = [e for e in entries if usable(e, banned, policy)]
    gaps = missing_blocks(ok, wanted)
    try:
        if kind == "inference":
            route = planner.plan_inference(entries, "m", wanted, banned=banned, cache_tokens=50)
        else:
            route = planner.plan_forward(entries, "m", wanted, banned=banned)
    except RoutingError as e:
        assert gaps and list(e.missing) == gaps
        assert all(f"{a}:{b}" in str(e) for a, b in gaps)
        return
    assert not gaps
    check_route(route, entries, wanted, banned, policy)


def plan(entries, wanted=(0, 8), **kw) -> list[tuple[str, str]]:
    planner = RoutePlanner(RoutingPolicy(jitter=0.0), random.Random(0))
    route = planner.plan_inference(entries, "m", BlockRange(*wanted), **kw)
    return [(h.peer_id, str(h.blocks)) for h in route]


def test_inference_prefers_fewer_hops_when_rtt_dominates() -> None:
    entries = [server("a", 0, 4), server("b", 4, 8), server("whole", 0, 8)]
    assert plan(entries, rtts={"a": 0.01, "b": 0.01, "whole": 0.01}) == [("whole", "0:8")]


def test_inference_avoids_a_slow_link_and_a_slow_server() -> None:
    entries = [server("a", 0, 4), server("b", 4, 8), server("whole", 0, 8)]
    assert plan(entries, rtts={"a": 0.01, "b": 0.01, "whole": 0.5}) == [
        ("a", "0:4"),
        ("b", "4:8"),
    ]
    slow = [server("a", 0, 4), server("b", 4, 8), server("whole", 0, 8, tput=1.0)]
    assert plan(slow) == [("a", "0:4"), ("b", "4:8")]


def test_inference_starts_mid_span_and_prefers_servers_with_cache() -> None:
    entries = [server("a", 0, 6), server("b", 2, 8), server("c", 4, 8, cache=10)]
    assert plan(entries, (3, 8)) == [("b", "3:8")]
    full = [server("a", 0, 8, cache=10), server("b", 0, 4), server("c", 4, 8)]
    assert plan(full, cache_tokens=100) == [("b", "0:4"), ("c", "4:8")]
    # When only a full server has the blocks it is still used (it may free tokens by then).
    assert plan([server("a", 0, 8, cache=10)], cache_tokens=100) == [("a", "0:8")]


def test_only_online_allowed_unbanned_servers() -> None:
    entries = [server("a", 0, 8, state="draining"), server("b", 0, 8), server("c", 0, 8)]
    assert plan(entries) == [("b", "0:8")]
    assert plan(entries, banned={"b"}) == [("c", "0:8")]
    planner = RoutePlanner(RoutingPolicy(allow=frozenset({"c"})))
    assert planner.plan_forward(entries, "m", BlockRange(0, 8))[0].peer_id == "c"


def test_missing_blocks_error_names_them() -> None:
    entries = [server("a", 0, 3), server("b", 5, 8), server("c", 3, 5, state="joining")]
    with pytest.raises(RoutingError, match=r"blocks 3:5 have no online server") as info:
        plan(entries)
    assert info.value.missing == ((3, 5),)
    with pytest.raises(RoutingError, match=r"1 peers banned") as info:
        plan(entries, banned={"a"})
    assert info.value.missing == ((0, 5),)  # adjacent gaps merge into one run


def test_forward_routes_spread_by_throughput() -> None:
    entries = [server("fast", 0, 8, tput=300.0), server("slow", 0, 8, tput=100.0)]
    planner = RoutePlanner(rng=random.Random(1))
    picks = [planner.plan_forward(entries, "m", BlockRange(0, 8))[0].peer_id for _ in range(400)]
    share = picks.count("fast") / len(picks)
    assert 0.65 < share < 0.85  # expected 0.75


def test_bans_back_off_exponentially_and_expire() -> None:
    bans = PeerBans(base=1.0, cap=8.0)
    assert bans.ban("p", now=0.0) == 1.0
    assert bans.banned(0.5) == {"p"} and bans.banned(1.0) == set()
    assert [bans.ban("p", now=10.0) for _ in range(4)] == [2.0, 4.0, 8.0, 8.0]
    bans.succeeded("p")
    assert bans.ban("p", now=20.0) == 1.0


def test_firm_bans_are_told_apart_from_failures() -> None:
    """SwarmClient.route_bans lets a failed peer back in when it alone holds some blocks, never
    one banned by the client's verdict (wrong outputs) or at its own word (busy): `firm` names
    those until their bans end. Catches: a firm ban not recorded (a cheater or a busy server
    let back in) or one outliving its ban."""
    bans = PeerBans(base=1.0, cap=8.0)
    bans.ban("failed", now=0.0)
    bans.ban("cheat", now=0.0, hard=100.0)
    bans.ban("cheat", now=1.0)  # a later failure does not shorten or lift the verdict
    bans.ban("busy", now=0.0, at_least=4.0)
    assert bans.banned(0.5) == {"failed", "cheat", "busy"}
    assert bans.firm(0.5) == {"cheat", "busy"} and bans.firm(99.0) == {"cheat"}
    assert bans.firm(100.0) == set() and bans.banned(100.0) == set()
