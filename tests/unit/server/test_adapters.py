"""Fine-tuning additions inside a span: a LoRA adapter gives exactly the blocks of a model whose
weights were merged (W + scale * B @ A), forward and gradients; deep prompts equal adding them to
each block's input; nothing of one call stays for the next; bad adapters are refused; a peft
adapter directory loads for the served blocks only."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch.func import functional_call

from petald.server import load_span
from petald.server.adapters import LoRA, check_lora, load_peft_adapter

START, END = 1, 3
TARGETS = {"llama": ["self_attn.q_proj", "mlp.down_proj"], "bloom": ["self_attention.dense"]}


def random_lora(span, targets, rank=4, seed=0) -> LoRA:
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for t in targets:
        lin = span.layers[0].get_submodule(t)
        n = len(span.blocks)
        a = torch.randn(n, rank, lin.in_features, generator=gen) * 0.1
        b = torch.randn(n, lin.out_features, rank, generator=gen) * 0.1
        weights[t] = (a, b)
    return LoRA(weights, 2.0)


def merged_hidden(model, layers_path, ids, mask, lora: LoRA, prompts=None):
    """The transformers model with W + scale * B @ A in blocks START:END (differentiably), and
    prompts added to those blocks' inputs: hidden states at END."""
    params = dict(model.named_parameters())
    new = {}
    for t, (a, b) in lora.weights.items():
        for j, block in enumerate(range(START, END)):
            name = f"{layers_path}.{block}.{t}.weight"
            new[name] = params[name] + lora.scale * b[j] @ a[j]
    handles = []
    if prompts is not None:
        layers = model.get_submodule(layers_path)
        for j, block in enumerate(range(START, END)):

            def pre(_m, args, kwargs, p=prompts[j]):
                h = args[0] if args else kwargs["hidden_states"]
                h = h + torch.nn.functional.pad(p, (0, 0, 0, h.shape[1] - p.shape[1]))
                return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

            handles.append(layers[block].register_forward_pre_hook(pre, with_kwargs=True))
    try:
        out = functional_call(
            model, new, (ids,), {"attention_mask": mask, "output_hidden_states": True}
        )
    finally:
        for h in handles:
            h.remove()
    return out.hidden_states[END]


@pytest.mark.parametrize("kind", ["llama", "bloom"])
def test_lora_equals_merged_weights_forward_and_gradients(kind, saved_model, batch):
    model, path = saved_model(kind)
    ids, mask = batch
    span = load_span(path, (START, END), progress=False)
    lora = random_lora(span, TARGETS[kind])
    for a, b in lora.weights.values():
        a.requires_grad_(True)
        b.requires_grad_(True)
    layers_path = span.family.layers_path
    with torch.no_grad():
        hs = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    out = span(hs[START], attention_mask=mask, lora=lora)
    ref = merged_hidden(model, layers_path, ids, mask, lora)
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=0)
    g = torch.randn_like(out) * real.unsqueeze(-1)
    params = [t for ab in lora.weights.values() for t in ab]
    mine = torch.autograd.grad(out, params, g)
    theirs = torch.autograd.grad(ref, params, g)
    for x, y in zip(mine, theirs, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    # The hooks are gone: the next call is the plain span again.
    with torch.no_grad():
        torch.testing.assert_close(span(hs[START], attention_mask=mask)[real], hs[END][real])


def test_deep_prompts_are_added_to_each_block_input(saved_model, batch):
    model, path = saved_model("llama")
    ids, _ = batch
    span = load_span(path, (START, END), progress=False)
    prompts = (torch.randn(END - START, 1, 3, 64) * 0.1).requires_grad_(True)
    empty = LoRA({}, 1.0)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    out = span(hs[START], prompts=prompts)
    ref = merged_hidden(model, span.family.layers_path, ids, None, empty, prompts)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    (mine,) = torch.autograd.grad(out.sum(), prompts)
    (theirs,) = torch.autograd.grad(ref.sum(), prompts)
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)
    # Step by step, the prompts land on the same positions.
    cache = span.new_cache(3, 8)
    with torch.no_grad():
        steps = [span.step(hs[START][:, :2], cache, 0, prompts=prompts.detach())]
        for pos in range(2, 7):
            x = hs[START][:, pos : pos + 1]
            steps.append(span.step(x, cache, pos, prompts=prompts.detach()))
    torch.testing.assert_close(torch.cat(steps, dim=1), ref.detach(), atol=1e-5, rtol=0)


def test_bad_adapters_are_refused(saved_model):
    _, path = saved_model("llama")
    span = load_span(path, (START, END), progress=False)
    blocks = list(span.layers)
    good = random_lora(span, ["self_attn.q_proj"])
    a, b = good.weights["self_attn.q_proj"]
    cases = [
        ({"self_attn.nope": (a, b)}, "not a layer"),
        ({"self_attn": (a, b)}, "not a linear layer"),
        ({"self_attn.q_proj": (a[:1], b)}, "must be"),
        ({"self_attn.q_proj": (a, b.transpose(1, 2))}, "must be"),
        ({"self_attn.q_proj": (a.long(), b)}, "floating-point"),
        ({"__import__('os')": (a, b)}, "bad LoRA target"),
        ({}, "1..8 targets"),
    ]
    for weights, message in cases:
        with pytest.raises(ValueError, match=message):
            check_lora(LoRA(weights, 1.0), blocks)


def test_peft_adapter_directory_loads_the_served_blocks(saved_model, tmp_path):
    _, path = saved_model("llama")
    span = load_span(path, (START, END), progress=False)
    rank, tensors = 4, {}
    for block in range(4):  # the file covers every block; the span reads 1 and 2
        for t, (i, o) in {"self_attn.q_proj": (64, 64), "self_attn.v_proj": (64, 32)}.items():
            prefix = f"base_model.model.model.layers.{block}.{t}"
            tensors[f"{prefix}.lora_A.weight"] = torch.full((rank, i), float(block))
            tensors[f"{prefix}.lora_B.weight"] = torch.full((o, rank), float(block))
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 8}))
    lora = load_peft_adapter(tmp_path, range(START, END), list(span.layers))
    assert lora.scale == 2.0 and set(lora.weights) == {"self_attn.q_proj", "self_attn.v_proj"}
    a, b = lora.weights["self_attn.v_proj"]
    assert a.shape == (2, rank, 64) and b.shape == (2, 32, rank)
    assert a[0].unique().tolist() == [1.0] and a[1].unique().tolist() == [2.0]
