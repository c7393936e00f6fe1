"""petald.dht.flood.PeerThrottle, sans-IO: the burst is allowed, the rate after it, a flood is
refused then banned for `ban_seconds`, invalid messages count toward the ban, peers are
independent, and the tracked peers stay bounded."""

from __future__ import annotations

from petald.dht.flood import PUT_THROTTLE, PeerThrottle, ThrottleConfig

CONFIG = ThrottleConfig(rate=2.0, burst=4, strikes_to_ban=3, ban_seconds=60.0)


def test_burst_then_rate_then_ban_then_clean_slate() -> None:
    """Catches: no refusal past the burst, no refill (2 per second), no ban after the strikes,
    a ban that never ends or ends early, and one peer's flood refusing another peer."""
    t = PeerThrottle(CONFIG)
    assert all(t.allow("a", 0.0) for _ in range(4))
    assert not t.allow("a", 0.0)  # strike 1
    assert t.allow("a", 0.5) and not t.allow("a", 0.5)  # one token refilled; strike 2
    assert t.allow("b", 0.5)
    assert not t.allow("a", 0.5)  # strike 3: banned
    assert t.banned("a", 1.0) and t.bans == 1
    assert not t.allow("a", 59.0)  # still banned, even with a full bucket
    assert not t.banned("a", 60.6) and t.allow("a", 60.6)


def test_invalid_messages_count_toward_the_ban() -> None:
    """Catches: strikes for invalid records ignored (a peer sending only bad ones, within the
    rate, is never banned)."""
    t = PeerThrottle(CONFIG)
    assert not t.strike("a", 0.0) and not t.strike("a", 0.0)
    assert t.strike("a", 0.0)
    assert not t.allow("a", 1.0)


def test_strikes_far_apart_never_add_up_to_a_ban() -> None:
    """An honest peer's occasional refused record (a clock that disagrees) over days is not a
    flood. Catches: strikes counted forever (the 3rd strike, minutes apart, bans)."""
    t = PeerThrottle(CONFIG)
    for i in range(10):
        assert not t.strike("a", i * (CONFIG.strike_window + 1.0))
    assert not t.banned("a", 1000.0)


def test_tracked_peers_stay_bounded_and_bans_survive_eviction() -> None:
    """Catches: a table that grows with every new peer id (a Sybil's memory attack), and
    eviction that forgets a banned peer before idle ones."""
    t = PeerThrottle(CONFIG, max_peers=8)
    for _ in range(3):
        t.strike("bad", 0.0)
    for i in range(100):
        t.allow(f"p{i}", float(i) / 100)
    assert len(t._peers) <= 8
    assert t.banned("bad", 2.0)


def test_put_throttle_admits_an_honest_server() -> None:
    """An honest server puts one announcement per heartbeat (30 s) per model to each of the k
    closest peers: one put every 30 s from a peer, ten models' worth in a burst, never refused.
    Catches: a put limit tight enough to refuse honest announcements."""
    t = PeerThrottle(PUT_THROTTLE)
    now = 0.0
    for _ in range(20):
        assert all(t.allow("server", now) for _ in range(10))
        now += 30.0
