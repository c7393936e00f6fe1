"""`petald status --web` against a real swarm: a bootstrap node and two `petald serve` processes
of a tiny Llama (blocks 0:2 and 2:4), the page rendered by Debian's headless Chromium (the
page's own script fetches /api/status and builds the DOM; we assert on the DOM Chromium dumps).

Waiting: the swarm view changes with no event visible from outside the status process, so the
tests poll its JSON endpoint (bounded by a deadline) until it shows the state a render must
show, then render once."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from petald.testing import DaemonProcess, Processes
from petald.testing.models import save_tiny_llama
from petald.testing.processes import spawn_announcer

pytestmark = pytest.mark.slow

MODEL = "tiny-llama-health"
# Chromium's virtual time: the page's first fetch and render happen well within it.
VIRTUAL_TIME_MS = 3000


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, DaemonProcess]]:
    """A bootstrap node and `petald status --web` joined through it."""
    tmp = tmp_path_factory.mktemp("health")
    with Processes() as procs:
        boot = procs.start("node", "--new-swarm", identity=tmp / "boot.key")
        web = procs.start(
            "status", "--web", "--listen", "127.0.0.1:0", "--initial-peers", boot.addr,
            identity=tmp / "web.key",
        )  # fmt: skip
        yield {"boot": boot, "web": web}


@pytest.fixture(scope="module")
def swarm(page, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, DaemonProcess]]:
    """`page`, and two servers of a tiny Llama: A with blocks 0:2, B with 2:4."""
    tmp = tmp_path_factory.mktemp("health-servers")
    save_tiny_llama(tmp / MODEL, layers=4)
    with Processes() as procs:
        servers = {}
        for name, blocks in {"A": "0:2", "B": "2:4"}.items():
            args = [str(tmp / MODEL), "--blocks", blocks, "--initial-peers", page["boot"].addr]
            # A fixed throughput and no dial-back check: neither is under test here.
            args += ["--throughput", "100", "--reachability", "public", "--cache-tokens", "64"]
            servers[name] = procs.spawn("serve", *args, identity=tmp / f"{name}.key")
        for d in servers.values():
            d.wait_ready(240)
        yield {**page, **servers}


def get(url: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def wait_api(web: DaemonProcess, what: str, check: Callable[[dict], bool], timeout: float = 45):
    """Polls /api/status until `check(status)`; returns that status."""
    deadline = time.monotonic() + timeout
    while True:
        status = json.loads(get(web.ready["api"])[2])
        if check(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"/api/status never showed {what}: {json.dumps(status)}")
        time.sleep(0.2)  # no event to wait on from outside the process: polled


def servers_of(status: dict, model: str = MODEL) -> dict[str, dict]:
    return {s["peer_id"]: s for m in status["models"] if m["model"] == model for s in m["servers"]}


class Dom(HTMLParser):
    """The elements of a dumped DOM: (tag, attributes, text directly inside)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str], list[str]]] = []
        self._open: list[int] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}, []))
        if tag not in ("meta", "img", "br", "input", "link"):
            self._open.append(len(self.elements) - 1)

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            if self.elements[self._open.pop()][0] == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._open:
            self.elements[self._open[-1]][2].append(data)

    def find(self, tag: str, **attrs: str) -> list[tuple[dict[str, str], str]]:
        return [
            (a, "".join(text))
            for t, a, text in self.elements
            if t == tag
            and all(a.get(k.rstrip("_").replace("_", "-")) == v for k, v in attrs.items())
        ]


def chromium(url: str, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp}",
         f"--virtual-time-budget={VIRTUAL_TIME_MS}", *args, url],
        capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def render(url: str, tmp: Path) -> Dom:
    """The page's DOM after its script ran, as headless Chromium dumps it."""
    r = chromium(url, tmp, "--dump-dom")
    assert r.returncode == 0, r.stderr[-2000:]
    dom = Dom(r.stdout)
    # The page's script fetched the status and rendered it at least once.
    assert dom.find("body")[0][0].get("data-renders"), r.stdout[-3000:]
    return dom


def test_page_shows_coverage_and_follows_a_server_stopping(swarm, tmp_path) -> None:
    """Catches: a page whose script does not render (no segments, no rows), coverage cut at
    the wrong boundaries or counted wrong, states not shown, latency never measured, a JSON
    endpoint that is not the status, and a stopping server that exits before its "draining"
    announcement went out (seen failing: B stayed online in the view until its announcement
    expired, 95 s; BlockServer.drain now waits for the publish, bounded)."""
    web, a, b = swarm["web"], swarm["A"], swarm["B"]

    def both_online_and_probed(st: dict) -> bool:
        got = [servers_of(st).get(p, {}) for p in (a.peer_id, b.peer_id)]
        return all(s.get("state") == "online" and (s["latency"] or {}).get("rtt_ms") for s in got)

    status = wait_api(web, "both servers online, with latencies", both_online_and_probed)
    (model,) = [m for m in status["models"] if m["model"] == MODEL]
    assert model["n_blocks"] == 4 and model["served_blocks"] == 4
    assert [(s["blocks"], s["servers"]) for s in model["coverage"]] == [("0:2", 1), ("2:4", 1)]
    assert model["weakest"]["servers"] == 1
    code, kind, _ = get(web.ready["api"])
    assert (code, kind) == (200, "application/json")

    dom = render(web.ready["url"], tmp_path / "chromium1")
    segs = {a["data-blocks"]: a["data-servers"] for a, _ in dom.find("div", class_="seg")}
    assert segs == {"0:2": "1", "2:4": "1"}
    rows = {a["data-peer"]: a for a, _ in dom.find("tr", class_="server")}
    assert {p: r["data-state"] for p, r in rows.items()} == {
        a.peer_id: "online",
        b.peer_id: "online",
    }
    assert {r["data-blocks"] for r in rows.values()} == {"0:2", "2:4"}
    latencies = [text for _, text in dom.find("td", class_="latency num")]
    assert len(latencies) == 2 and all(t.endswith(" ms") for t in latencies), latencies
    assert "2 server(s) online" in dom.find("div", id="summary")[0][1]
    if shot := os.environ.get("PETALD_HEALTH_SCREENSHOT"):  # a picture for people, on request
        chromium(web.ready["url"], tmp_path / "chromium-shot", f"--screenshot={shot}",
                 "--window-size=1300,700")  # fmt: skip

    b.stop()  # SIGTERM: B drains (announces draining) and exits
    wait_api(
        web,
        "B no longer online",
        lambda st: servers_of(st).get(b.peer_id, {}).get("state") in (None, "draining"),
    )
    dom = render(web.ready["url"], tmp_path / "chromium2")
    segs = {a["data-blocks"]: a["data-servers"] for a, _ in dom.find("div", class_="seg")}
    assert segs == {"0:2": "1", "2:4": "0"}  # the gap, shown as missing
    assert [t for a, t in dom.find("div", class_="seg") if a["data-blocks"] == "2:4"] == [
        "2:4 missing"
    ]
    states = {a["data-peer"]: a["data-state"] for a, _ in dom.find("tr", class_="server")}
    assert states.get(a.peer_id) == "online" and states.get(b.peer_id) in (None, "draining")


def test_announced_names_are_text_not_html(page, tmp_path) -> None:
    """Catches: the page inserting an announced (untrusted) model name as HTML (innerHTML):
    the name's <img> element and <script> would be in the DOM."""
    hostile = '<img id="pwned" src="x" onerror="document.title=1"><script>document.title=2</script>'
    with Processes() as procs:
        procs.adopt(
            spawn_announcer(hostile, "0:1", "--initial-peers", page["boot"].addr)
        ).wait_ready(60)
        wait_api(page["web"], "the hostile announcement", lambda st: bool(servers_of(st, hostile)))
        dom = render(page["web"].ready["url"], tmp_path / "chromium")
    assert not dom.find("img")
    assert [t for _, t in dom.find("h2")].count(hostile) == 1  # shown, as text
    assert len(dom.find("script")) == 1  # the page's own
    assert dom.find("title")[0][1] == "petald swarm health"
