"""The runner's guards (petald.server.families): what makes a family refused rather than served
wrong. The census (test_families_census.py) runs every real family; these pin each guard."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma4TextConfig

from petald.server import load_span
from petald.server.families import Unsupported, _Call, family_for


def test_per_layer_inputs_from_token_ids_are_refused() -> None:
    config = Gemma4TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        vocab_size_per_layer_input=64, hidden_size_per_layer_input=8,
    )  # fmt: skip
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="per-layer inputs computed from the token ids"):
        family_for(model)


def test_a_forward_that_changes_the_hidden_state_between_blocks_is_refused(saved_model) -> None:
    _, path = saved_model("llama")
    span = load_span(path, (0, 2), progress=False)
    runner = span.runner
    x = torch.zeros(1, 2, 64)
    runner._call = _Call(0, 2, x, None, 0, None)
    try:
        runner._call.last = torch.ones(1, 2, 64)  # what block 0 returned
        with pytest.raises(Unsupported, match="changes the hidden state between layers"):
            runner.layer_call(1, (torch.ones(1, 2, 64) * 2,), {})  # the forward handed another
    finally:
        runner._call = None


def test_layer_inputs_computed_from_outside_the_blocks_are_refused(saved_model) -> None:
    _, path = saved_model("llama")
    span = load_span(path, (0, 2), progress=False)
    runner = span.runner
    x = torch.zeros(1, 2, 64)
    runner._call = _Call(0, 2, x, None, 0, None, probe=True)
    try:
        leak = {"position_embeddings": (torch.full((1, 2, 16), float("nan")),) * 2}
        with pytest.raises(Unsupported, match=r"inputs \['position_embeddings'\] computed from"):
            runner.layer_call(0, (x,), leak)
    finally:
        runner._call = None


def test_a_loaded_span_leaves_the_meta_model_on_meta(saved_model) -> None:
    """Embeddings, final norm and LM head are never allocated: only the span's layers and the
    forward's own non-persistent buffers (rotary frequencies) hold memory."""
    _, path = saved_model("llama")
    span = load_span(path, (1, 3), progress=False)
    model = span.family.model
    real = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if not t.is_meta]
    assert real == ["model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"]
    assert all(not p.is_meta for p in span.parameters())
