"""Weight hashes (petald.server.weights): what `load_span` announces is the same in every process
and for every checkpoint format of the same tensors, and any change to one weight changes it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from petald.server.loading import load_span
from petald.server.weights import block_hash
from petald.testing.models import save_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "tiny"
    save_tiny_llama(path, layers=3, seed=5)
    return path


def test_hashes_are_stable_across_processes(tiny: Path) -> None:
    """The digests load_span computes here equal those another interpreter (another str hash
    seed) computes straight from the checkpoint's tensors, one per block, all different.
    Catches: hashing in dict order instead of sorted names, hashing something
    process-specific (ids, pointers), or load_span hashing other tensors than the served ones."""
    span = load_span(tiny, (0, 3), progress=False)
    here = [h.hex() for h in span.weight_hashes]
    # Only torch and safetensors there (transformers would cost seconds of imports).
    code = """
import sys
from safetensors.torch import load_file
from petald.server.weights import block_hash
state = load_file(sys.argv[1])
for b in range(3):
    p = f"model.layers.{b}."
    print(block_hash({k.removeprefix(p): v for k, v in state.items() if k.startswith(p)}).hex())
"""
    out = subprocess.run(
        [sys.executable, "-c", code, str(tiny / "model.safetensors")],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
        timeout=300,
    ).stdout.split()
    assert out == here
    assert len(set(here)) == 3 and all(len(h) == 32 for h in here)


def test_one_ulp_changes_the_hash(tiny: Path) -> None:
    """A weight moved by one ulp, a renamed tensor, another dtype and another shape of the
    same bytes each change the block's hash; the same tensors in another order do not.
    Catches: hashing rounded or summarized weights, or leaving names, dtypes or shapes out."""
    span = load_span(tiny, (0, 1), progress=False)
    state = {k: v.clone() for k, v in span.layers[0].state_dict().items()}
    base = block_hash(state)
    assert base == span.weight_hashes[0] == block_hash(span.layers[0])
    assert block_hash(dict(reversed(list(state.items())))) == base
    name = "mlp.down_proj.weight"
    bumped = dict(state)
    bumped[name] = state[name].clone()
    bumped[name].view(-1)[17] = torch.nextafter(bumped[name].view(-1)[17], torch.tensor(1e9))
    assert bumped[name].view(-1)[17] != state[name].view(-1)[17]
    assert block_hash(bumped) != base
    renamed = {(k + "x" if k == name else k): v for k, v in state.items()}  # same order
    assert block_hash(renamed) != base
    as_bf16 = {k: v.to(torch.bfloat16) for k, v in state.items()}
    assert block_hash(as_bf16) != base
    reshaped = dict(state)
    reshaped[name] = state[name].reshape(-1)
    assert block_hash(reshaped) != base
    # Non-contiguous tensors hash as their row-major values.
    t = dict(state)
    t[name] = state[name].t().contiguous().t()
    assert not t[name].is_contiguous() and block_hash(t) == base
