"""`petald status` rendering: coverage segments with gaps, JSON shape, text output."""

from petald.cli.status import coverage_segments, render_status, status_json
from petald.p2p.swarm_view import ServerEntry, SwarmView
from petald.types import BlockRange, ServerInfo


def entry(peer: str, a: int, b: int, state: str = "online", relayed: bool = False) -> ServerEntry:
    info = ServerInfo(
        model="m",
        blocks=BlockRange(a, b),
        n_blocks=30,
        state=state,
        throughput=5.0,
        relayed=relayed,
    )  # type: ignore[arg-type]
    return ServerEntry(peer, info, 100.0, 100.0, "gossip")


def test_coverage_shows_gaps_and_counts_only_online() -> None:
    es = [entry("a", 0, 10), entry("b", 5, 15), entry("c", 20, 30, state="joining")]
    segs = coverage_segments(es, 30)
    assert [(s["blocks"], s["servers"]) for s in segs] == [
        ("0:5", 1),
        ("5:10", 2),
        ("10:15", 1),
        ("15:20", 0),
        ("20:30", 0),
    ]


def test_status_json_and_text() -> None:
    v = SwarmView()
    for e in (entry("a", 0, 15), entry("b", 15, 30, relayed=True)):
        v.update(e, now=0)
    st = status_json(v, now=1, peers=7)
    assert st["peers"] == 7 and st["models"][0]["n_blocks"] == 30
    assert [s["servers"] for s in st["models"][0]["coverage"]] == [1, 1]
    text = render_status(st)
    assert "m of 30 blocks" in text and "relay" in text and "MISSING" not in text
    assert "7 peers" in text
