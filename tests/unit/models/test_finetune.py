"""Client-side fine-tuning parts without a swarm: the client LoRA's peft layout (read back by
petald.models and by the server's adapter loader, so `petald serve --adapters` serves what a
client trained), its initialisation, and the prompt-tuning arguments."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig

from petald.models import RemoteLoRA, RemoteTuning
from petald.server.adapters import load_peft_adapter
from petald.testing.models import tiny_config_kwargs

CONFIG = LlamaConfig(**tiny_config_kwargs(layers=3, intermediate=96))


def test_lora_starts_as_the_unchanged_model_and_saves_in_peft_layout(tmp_path) -> None:
    lora = RemoteLoRA(CONFIG, ["self_attn.q_proj", "self_attn.k_proj"], rank=4, alpha=8)
    a, b = lora.weights()["self_attn.k_proj"]
    assert a.shape == (3, 4, 64) and b.shape == (3, 32, 4)  # k_proj: 2 kv heads of 16
    assert not b.any() and a.std() > 0 and lora.scale == 2.0
    with torch.no_grad():
        b.normal_()
    lora.save_peft(tmp_path / "ad", base_model="tiny")
    keys = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert keys["base_model.model.model.layers.2.self_attn.k_proj.lora_B.weight"].shape == (32, 4)
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)

    back = RemoteLoRA.load_peft(tmp_path / "ad", CONFIG)
    for t, (x, y) in lora.weights().items():
        assert torch.equal(back.weights()[t][0], x) and torch.equal(back.weights()[t][1], y)
    # The server's loader (petald serve --adapters) reads the same blocks and scale.
    from transformers import LlamaForCausalLM

    layers = list(LlamaForCausalLM(CONFIG).model.layers[1:3])
    served = load_peft_adapter(tmp_path / "ad", range(1, 3), layers)
    assert served.scale == 2.0
    assert torch.equal(served.weights["self_attn.k_proj"][1], b[1:3])


def test_lora_refuses_what_servers_would() -> None:
    with pytest.raises(ValueError, match="not linear layers"):
        RemoteLoRA(CONFIG, ["self_attn"])
    with pytest.raises(ValueError, match="rank must be"):
        RemoteLoRA(CONFIG, ["self_attn.q_proj"], rank=0)


def test_prompt_tuning_arguments() -> None:
    tuning = RemoteTuning(3, 64)
    embeddings = torch.randn(128, 64)
    with pytest.raises(ValueError, match="tuning_mode must be one of"):
        tuning.enable_prompts("prefix", 4, embeddings)
    with pytest.raises(ValueError, match="pre_seq_len"):
        tuning.enable_prompts("ptune", 0, embeddings)
    tuning.enable_prompts("deep_ptune", 4, embeddings)
    assert tuning.pre_seq_len == 4 and tuning.deep_prompts is not None
    assert not tuning.deep_prompts.any()  # deep prompts start at zero (P-Tuning v2)
    x, mask, positions = tuning.extend(
        torch.zeros(2, 3, 64), torch.ones(2, 3, dtype=torch.long), torch.arange(3).expand(2, 3)
    )
    assert x.shape == (2, 7, 64) and mask.shape == (2, 7)
    assert positions.tolist()[0] == [0, 1, 2, 3, 4, 5, 6]
    wire = tuning.wire()
    assert wire is not None and wire.names == ["prompts"] and wire.pre_seq_len == 4


def test_peft_loads_a_saved_client_lora_as_the_same_deltas(tmp_path) -> None:
    """peft itself reads the saved adapter onto the full local model: its outputs are the base
    model's with W + alpha/r * B @ A on every target (what the swarm computes)."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(CONFIG).eval()
    lora = RemoteLoRA(CONFIG, ["self_attn.q_proj", "mlp.down_proj"], rank=4, alpha=8)
    with torch.no_grad():
        for b in lora.B.values():
            b.normal_(std=0.1)
    lora.save_peft(tmp_path / "ad")
    ids = torch.randint(0, 128, (2, 6))
    merged = LlamaForCausalLM(CONFIG).eval()
    merged.load_state_dict(base.state_dict())
    with torch.no_grad():
        for t, (a, b) in lora.weights().items():
            for i, layer in enumerate(merged.model.layers):
                layer.get_submodule(t).weight += lora.scale * b[i] @ a[i]
        want = merged(ids).logits
        got = peft.PeftModel.from_pretrained(base, tmp_path / "ad").eval()(ids).logits
    assert (got - want).abs().max() < 1e-5
