"""`petald serve --metrics 127.0.0.1:0` as a real process (a tiny Llama, all blocks on one
server): its Prometheus endpoint, read as Prometheus reads it (HTTP GET, text exposition parsed
by prometheus_client's parser), follows a generation step by step and counts a refused request
under its error code."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from petald import AutoDistributedModelForCausalLM
from petald.client import ClientConfig, SwarmClient
from petald.testing import DaemonProcess, Processes
from petald.testing.models import save_tiny_llama
from petald.testing.rpc import rpc_call
from petald.wire.protocols import FORWARD_PROTOCOL

pytestmark = pytest.mark.slow

MODEL = "tiny-llama-metrics"
NEW_TOKENS = 6
MAX_LENGTH = 32


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, Path]]:
    tmp = tmp_path_factory.mktemp("metrics")
    save_tiny_llama(tmp / MODEL, layers=2, seed=3)
    with Processes() as procs:
        args = [str(tmp / MODEL), "--blocks", "0:2", "--new-swarm", "--metrics", "127.0.0.1:0"]
        args += ["--throughput", "100", "--reachability", "public", "--cache-tokens", "256"]
        yield procs.start("serve", *args, identity=tmp / "server.key", ready_timeout=240), tmp


def scrape(server: DaemonProcess) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one GET of the metrics endpoint."""
    with urllib.request.urlopen(server.ready["metrics"], timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(m: dict, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


STEPS = ("petald_requests_total", {"kind": "inference_step", "result": "ok"})


def test_a_generation_moves_the_step_counter_and_the_session_gauges(server) -> None:
    """Catches: steps not counted (or counted twice, or as opens), sessions or cache tokens not
    tracked while a session is open or not released after, step latencies not observed, wire
    bytes not counted."""
    daemon, tmp = server
    before = scrape(daemon)
    assert value(before, "petald_server_state", state="online") == 1
    assert value(before, "petald_inference_sessions_open") == 0
    config = ClientConfig(initial_peers=(daemon.addr,), step_timeout=30, request_timeout=30)
    with SwarmClient(config=config) as client:
        client.wait_for_blocks(MODEL, 2, timeout=60)
        model = AutoDistributedModelForCausalLM.from_pretrained(tmp / MODEL, client=client)
        ids = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(0))
        with model.inference_session(max_length=MAX_LENGTH) as cache:
            model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
            steps = cache.session.stats.steps
            during = scrape(daemon)
    assert steps == NEW_TOKENS  # a prefill, then one step per new token but the last
    assert value(during, *STEPS[:1], **STEPS[1]) - value(before, *STEPS[:1], **STEPS[1]) == steps
    opened = ("petald_requests_total", {"kind": "inference_open", "result": "ok"})
    assert value(during, opened[0], **opened[1]) - value(before, opened[0], **opened[1]) == 1
    assert value(during, "petald_inference_sessions_open") == 1
    assert value(during, "petald_kv_cache_tokens_used") == MAX_LENGTH  # batch 1 x max_length
    assert value(during, "petald_kv_cache_tokens_budget") == 256
    timed = "petald_request_duration_seconds_count"
    assert (
        value(during, timed, kind="inference_step") - value(before, timed, kind="inference_step")
        == steps
    )
    assert value(during, "petald_network_received_bytes_total") > value(
        before, "petald_network_received_bytes_total"
    )
    assert value(during, "petald_network_sent_bytes_total") > 0
    assert value(during, "petald_connected_peers") >= 1
    # The server frees the session when the client's stream ends; nothing to wait on from
    # here but the gauge itself: polled, bounded.
    deadline = time.monotonic() + 20
    while (after := scrape(daemon)) and value(after, "petald_inference_sessions_open"):
        assert time.monotonic() < deadline, "the session never closed on the server"
        time.sleep(0.1)
    assert value(after, "petald_kv_cache_tokens_used") == 0


async def test_a_refused_request_is_counted_with_its_error_code(server) -> None:
    """Catches: refusals counted as ok, or under another code or kind."""
    daemon, _ = server
    label = {"kind": "forward", "result": "bad_blocks"}
    before = value(scrape(daemon), "petald_requests_total", **label)
    answer, _ = await rpc_call(
        daemon, FORWARD_PROTOCOL, {"start": 1, "end": 9}, [torch.randn(1, 3, 64)]
    )
    assert answer["error"] == "bad_blocks"
    after = scrape(daemon)
    assert value(after, "petald_requests_total", **label) == before + 1
    assert value(after, "petald_requests_total", kind="forward", result="ok") == 0
