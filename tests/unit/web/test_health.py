"""The health page's pieces without a network: the status it shows (weakest block, served
blocks, latency per server), its routes and headers, and the `--listen`/`--metrics` addresses
users type."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from petald.cli.status import split_listen, status_json
from petald.p2p.swarm_view import ServerEntry, SwarmView
from petald.types import BlockRange, ServerInfo
from petald.web.health import health_routes
from petald.web.http import HttpAddress
from petald.web.latency import Probe


def entry(peer: str, a: int, b: int, state: str = "online") -> ServerEntry:
    info = ServerInfo(model="m", blocks=BlockRange(a, b), n_blocks=8, state=state)  # type: ignore[arg-type]
    return ServerEntry(peer, info, 100.0, 100.0, "gossip")


def test_status_has_the_weakest_block_served_blocks_and_latency() -> None:
    """Catches: the weakest segment taken as the first or the strongest, gaps counted as
    served, probes attached to the wrong server."""
    v = SwarmView()
    for e in (entry("a", 0, 4), entry("b", 2, 6), entry("c", 6, 8, state="draining")):
        v.update(e, now=0)
    probes = {"b": Probe(1.5, False, None, 0.0), "c": Probe(None, None, "timed out", 0.0)}
    (m,) = status_json(v, now=1, peers=3, probes=probes)["models"]
    assert [(s["blocks"], s["servers"]) for s in m["coverage"]] == [
        ("0:2", 1),
        ("2:4", 2),
        ("4:6", 1),
        ("6:8", 0),
    ]
    assert m["served_blocks"] == 6 and m["weakest"]["blocks"] == "6:8"
    latency = {s["peer_id"]: s["latency"] for s in m["servers"]}
    assert latency["a"] is None and latency["b"]["rtt_ms"] == 1.5
    assert latency["c"] == {"rtt_ms": None, "relayed": None, "error": "timed out"}


def test_page_and_api_routes() -> None:
    """Catches: a CSP that does not allow the page's own script (the page would not render)
    or allows any inline script, the JSON served as HTML, routes that accept writes."""
    calls = []

    def view() -> dict:
        calls.append(1)
        return {"event": "status", "peers": 0, "models": [{"model": "<b>x</b>"}]}

    client = TestClient(Starlette(routes=health_routes(view)))
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    (script,) = re.findall(r"<script>(.*?)</script>", page.text, flags=re.S)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    csp = page.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["script-src"] == f"'sha256-{digest}'"  # only the page's own script
    assert directives["default-src"] == "'none'" and directives["connect-src"] == "'self'"
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script
    api = client.get("/api/status")
    assert api.headers["content-type"] == "application/json"
    assert api.json()["models"][0]["model"] == "<b>x</b>" and calls == [1]
    assert client.post("/api/status").status_code == 405


def test_listen_addresses() -> None:
    """Catches: multiaddrs taken for the page's address or the other way round, bad ports or
    host names accepted."""
    assert HttpAddress.parse("127.0.0.1:0") == HttpAddress("127.0.0.1", 0)
    assert HttpAddress.parse("[::1]:8001").bind() == "[::1]:8001"
    for bad in ("8001", "127.0.0.1:", "127.0.0.1:70000", "example.com:80", ":80"):
        with pytest.raises(ValueError, match="--listen"):
            HttpAddress.parse(bad)
    multi, web = split_listen(["/ip4/127.0.0.1/tcp/5", "127.0.0.1:0"], web=True)
    assert multi == ["/ip4/127.0.0.1/tcp/5"] and web == HttpAddress("127.0.0.1", 0)
    assert split_listen(["127.0.0.1:0"], web=True)[0] == ["/ip4/127.0.0.1/tcp/0"]
    assert split_listen(None, web=True)[1] == HttpAddress("127.0.0.1", 8001)
    assert split_listen(["/ip4/0.0.0.0/tcp/0"], web=False) == (["/ip4/0.0.0.0/tcp/0"], None)
    with pytest.raises(ValueError, match="is where --web serves"):
        split_listen(["127.0.0.1:0"], web=False)
