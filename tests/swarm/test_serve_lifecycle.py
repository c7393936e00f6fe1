"""A `petald serve` process's life in the swarm: `--num-blocks` takes the blocks nobody serves,
the measured throughput is announced and cached, SIGTERM drains (new sessions refused, the active
one finishes, then the process exits on its own), and serving half of a model costs about half
of its weights in memory."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import trio

from petald.server import throughput
from petald.server.handlers import FORWARD_PROTOCOL, INFO_PROTOCOL
from petald.server.inference import INFERENCE_PROTOCOL
from petald.testing import DaemonProcess, Processes
from petald.testing.models import save_tiny_llama
from petald.testing.rpc import RawSession, rpc_call, rpc_client
from petald.wire.messages import write_message

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "lifecycle-llama"
    save_tiny_llama(path, layers=4)
    return path


async def info_of(server: DaemonProcess) -> dict:
    header, _ = await rpc_call(server, INFO_PROTOCOL, {})
    return header


async def test_num_blocks_takes_the_unserved_blocks_and_announces_cached_throughput(
    model_dir: Path, tmp_path: Path, procs: Processes
) -> None:
    """The first server finds an invalid cached value under its key and measures (then caches
    what it measured, keeping the other entries); the second, with a span of the same size,
    announces the cached value: a number planted there before it started, which no measurement
    gives. Catches: the cache never read, never written, read under another key, or an invalid
    (negative) cached value taken as the throughput."""
    cache = {"PETALD_CACHE_DIR": str(tmp_path / "cache")}
    table_path = tmp_path / "cache" / "throughput.json"
    # The compute process's view of a 2-block span (petald.server.worker's info).
    worker = {"blocks": [0, 2], "device": "cpu", "dtype": "float32", "quant": "none"}
    key = throughput.cache_key("lifecycle-llama", {**worker, "torch": torch.__version__})
    other = key.replace("2 blocks", "3 blocks")
    table_path.parent.mkdir()
    table_path.write_text(json.dumps({key: -1.0, other: 7.0}))
    boot = procs.start("node", "--new-swarm", identity=tmp_path / "boot.key")
    first = procs.start(
        "serve", str(model_dir), "--blocks", "0:2", "--initial-peers", boot.addr,
        identity=tmp_path / "a.key", ready_timeout=120, env=cache,
    )  # fmt: skip
    a = await info_of(first)
    assert a["throughput"] > 0
    assert json.loads(table_path.read_text()) == {key: a["throughput"], other: 7.0}
    planted = 12345.5
    table_path.write_text(json.dumps({key: planted, other: 7.0}))
    second = procs.start(
        "serve", str(model_dir), "--num-blocks", "2", "--initial-peers", boot.addr,
        identity=tmp_path / "b.key", ready_timeout=120, env=cache,
    )  # fmt: skip
    b = await info_of(second)
    assert a["blocks"] == [0, 2] and b["blocks"] == [2, 4]
    assert a["state"] == b["state"] == "online"
    print(f"throughput: 0:2 {a['throughput']:.0f} tokens/s measured, 2:4 {b['throughput']} cached")
    assert b["throughput"] == planted  # reused, not measured again
    assert json.loads(table_path.read_text()) == {key: planted, other: 7.0}


async def test_sigterm_drains_then_exits(model_dir: Path, tmp_path: Path, procs: Processes) -> None:
    boot = procs.start("node", "--new-swarm", identity=tmp_path / "boot.key")
    server = procs.start(
        "serve", str(model_dir), "--blocks", "0:4", "--initial-peers", boot.addr,
        "--drain-timeout", "120", "--throughput", "100",
        identity=tmp_path / "s.key", ready_timeout=120,
    )  # fmt: skip
    async with rpc_client(server) as open_stream:
        s = RawSession(await open_stream(INFERENCE_PROTOCOL))
        opened, _ = await s.send({"batch": 1, "max_length": 16})
        assert opened["ok"]
        h, _ = await s.send({"step": 0, "position": 0}, [torch.randn(1, 3, 64)])
        assert h["position"] == 3
        server.proc.send_signal(signal.SIGTERM)
        await trio.to_thread.run_sync(lambda: server.read_event("draining", timeout=30))
        # New sessions and requests are refused with a reason; the open one goes on.
        refused = RawSession(await open_stream(INFERENCE_PROTOCOL))
        answer, _ = await refused.send({"batch": 1, "max_length": 16})
        assert answer["error"] == "draining"
        info, _ = await RawSession(await open_stream(INFO_PROTOCOL)).send({})
        assert info["state"] == "draining"
        h, _ = await s.send({"step": 1, "position": 3}, [torch.randn(1, 1, 64)])
        assert h["position"] == 4
        assert server.proc.poll() is None  # still serving the open session
        await write_message(s.stream, {"close": True})
    # The last session ended: the server exits by itself, well before the drain timeout.
    code = await trio.to_thread.run_sync(lambda: server.proc.wait(60))
    assert code == 0


def memory(info: dict) -> tuple[int, int, int]:
    """(held now, peak, span weights), RSS growth over the compute process's baseline."""
    m = info["memory"]
    base = m["baseline_rss"]
    return m["rss"] - base, m["peak_rss"] - base, m["weight_bytes"]


async def test_serving_half_the_blocks_costs_half_the_weights(
    tmp_path: Path, procs: Processes
) -> None:
    """8 blocks of ~50 MB: the compute process of a 0:4 server grows by about 4 blocks' weights
    (printed), far from the whole model's."""
    path = tmp_path / "mem-llama"
    model = save_tiny_llama(
        path, layers=8, hidden=1024, intermediate=2816, heads=8, kv_heads=8, vocab=256
    )
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    boot = procs.start("node", "--new-swarm", identity=tmp_path / "boot.key")
    half = procs.start(
        "serve", str(path), "--blocks", "0:4", "--initial-peers", boot.addr,
        "--throughput", "100", identity=tmp_path / "h.key", ready_timeout=180,
    )  # fmt: skip
    # A forward through the span touches every weight (pages of a mapped checkpoint count only
    # once read).
    answer, _ = await rpc_call(half, FORWARD_PROTOCOL, {}, [torch.randn(1, 8, 1024)])
    assert answer["ok"]
    held, peak, weights = memory(await info_of(half))
    mib = 2**20
    print(
        f"serving 4 of 8 blocks: compute process holds +{held / mib:.0f} MiB after a forward "
        f"(peak +{peak / mib:.0f} MiB) for {weights / mib:.0f} MiB of span weights "
        f"(ratio {held / weights:.2f}, peak {peak / weights:.2f}); whole model "
        f"{whole / mib:.0f} MiB"
    )
    assert weights < 0.55 * whole
    assert 0.8 * weights < held < 1.3 * weights + 64 * mib  # one copy of the span, no more
    assert peak < 1.5 * weights + 64 * mib < whole + 64 * mib


async def test_quantized_server_announces_int8_and_stays_close(
    tmp_path: Path, procs: Processes
) -> None:
    """An int8 server holds int8 weights (about a quarter of the float32 bytes: 1 byte of 4,
    plus per-row scales and the float32 norms) and its block's output is off the float32 one by
    int8 rounding: more than float32 rounding (~eps*sqrt(hidden) = 1.3e-6 relative; bound
    1e-4) and less than tests/unit/server/test_quant.py's MAX_REL_ERROR for int8 (0.03).
    Catches: a server announcing int8 while serving float32 (the old test passed it), weights
    quantized but not used."""
    path = tmp_path / "quant-llama"
    model = save_tiny_llama(path, layers=2, hidden=128, intermediate=256, vocab=256)
    fp32_bytes = sum(
        t.numel() * t.element_size() for t in model.model.layers[:2].state_dict().values()
    )
    boot = procs.start("node", "--new-swarm", identity=tmp_path / "boot.key")
    server = procs.start(
        "serve", str(path), "--blocks", "0:2", "--quant", "int8", "--throughput", "100",
        "--initial-peers", boot.addr, identity=tmp_path / "q.key", ready_timeout=180,
    )  # fmt: skip
    info = await info_of(server)
    assert info["quant"] == "int8"
    ratio = info["memory"]["weight_bytes"] / fp32_bytes
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    answer, (out,) = await rpc_call(server, FORWARD_PROTOCOL, {"end": 1}, [hs[0]])
    rel = ((out - hs[1]).norm() / hs[1].norm()).item()
    print(f"int8 block 0 over the wire: relative error {rel:.4f}, weight bytes {ratio:.3f}x")
    assert 0.2 < ratio < 0.35
    assert answer["ok"] and 1e-4 < rel < 0.03
