"""petald.gguf_file against the `gguf` package's own reader on the real SmolLM2 file: the same
metadata, and tensor bytes laid out exactly as `gguf.dequantize` and transformers expect them.
Catches: a wrong byte shape for quantized types (rows of whole blocks), an offset not counted
from the aligned data section, a config cache that returns another file's config."""

from __future__ import annotations

import numpy as np
import pytest

from petald._native import gguf_dequantize
from petald.errors import GGUFError
from petald.gguf_file import GGUFFile, gguf_config
from petald.testing.models import smollm2_gguf


@pytest.fixture(scope="module")
def reference():
    from gguf import GGUFReader

    return GGUFReader(str(smollm2_gguf()))


def test_index_matches_the_gguf_reader(reference) -> None:
    with GGUFFile(smollm2_gguf()) as ours:
        assert ours.architecture == "llama"
        assert ours.metadata["llama.block_count"] == 30
        tokens = reference.fields["tokenizer.ggml.tokens"]
        assert len(ours.metadata["tokenizer.ggml.tokens"]) == len(tokens.data)
        assert list(ours.tensors) == [t.name for t in reference.tensors]
        types = set()
        for theirs in reference.tensors:
            mine = ours.tensors[theirs.name]
            assert mine.ggml_type == int(theirs.tensor_type)
            assert mine.offset == theirs.data_offset
            raw = ours.raw(mine)
            assert raw.dtype == theirs.data.dtype and raw.shape == theirs.data.shape
            assert np.array_equal(raw, theirs.data), theirs.name
            types.add(theirs.tensor_type.name)
        assert {"F32", "Q4_1"} <= types  # both layouts were compared


def test_config_is_cached_per_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PETALD_CACHE_DIR", str(tmp_path))
    fresh = gguf_config(smollm2_gguf())
    (entry,) = (tmp_path / "gguf-configs").iterdir()
    cached = gguf_config(smollm2_gguf())
    assert cached.to_dict() == fresh.to_dict()
    assert fresh.num_hidden_layers == 30 and fresh.model_type == "llama"
    # A damaged entry is read again and replaced, not trusted.
    (entry / "config.json").write_text("{not json")
    assert gguf_config(smollm2_gguf()).to_dict() == fresh.to_dict()


def test_malformed_files_are_clear_errors(tmp_path) -> None:
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        GGUFFile(empty)
    head = smollm2_gguf().read_bytes()[:4096]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(head)
    with pytest.raises(GGUFError, match="truncated"):
        GGUFFile(cut)
    # The whole header but no tensor data: the index reads, the first tensor does not.
    with GGUFFile(smollm2_gguf()) as full:
        header = smollm2_gguf().read_bytes()[: full.data_start]
    short = tmp_path / "short.gguf"
    short.write_bytes(header)
    with GGUFFile(short) as f:
        first = next(iter(f.tensors.values()))
        with pytest.raises(GGUFError, match="past the end of the file"):
            f.raw(first)


def test_rust_dequantization_is_bit_exact(reference) -> None:
    """Every Q4_1/Q8_0/F32 tensor of the real file, and random Q4_0/Q4_1/Q8_0 blocks, against
    gguf's numpy code. Catches: nibbles in the wrong order, an unsigned Q4_0/Q8_0, a fused
    multiply-add (one rounding instead of two)."""
    from gguf import GGMLQuantizationType, dequantize

    with GGUFFile(smollm2_gguf()) as ours:
        for theirs in reference.tensors[:40]:
            got = ours.dequantize(ours.tensors[theirs.name])
            want = dequantize(theirs.data, theirs.tensor_type)
            assert got.dtype == np.float32 and got.shape == want.shape
            assert np.array_equal(got, want), theirs.name
    rng = np.random.default_rng(0)
    for qtype, block in ((2, 18), (3, 20), (8, 34)):
        raw = rng.integers(0, 256, size=(64, block), dtype=np.uint8)
        # finite scales: random f16 bit patterns include NaN and inf, which compare unequal
        raw[:, :2] = np.frombuffer(
            rng.standard_normal(64).astype(np.float16).tobytes(), np.uint8
        ).reshape(64, 2)
        if qtype == 3:
            raw[:, 2:4] = raw[:, :2][::-1]
        got = np.frombuffer(gguf_dequantize(qtype, raw), np.float32)
        want = dequantize(raw, GGMLQuantizationType(qtype)).reshape(-1)
        assert np.array_equal(got, want), qtype
