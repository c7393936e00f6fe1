"""Tiny random-weight models of every family petald serves, built in code and saved with
`save_pretrained` (safetensors) into temporary directories. A test that takes a `family`
argument runs once per family; `saved_model`, `hidden_of` and `batch` are fixtures (test modules
are imported with importlib, so helpers are handed out as fixtures rather than imported)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    FalconConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 256
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4)
LLAMA_LIKE = dict(COMMON, intermediate_size=96, num_key_value_heads=2)

TINY_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": lambda: LlamaConfig(**LLAMA_LIKE),
    # SmolLM2-135M's shape, scaled down: 9 heads of 8 over 3 KV heads, rope theta 1e5, tied
    # embeddings (so the checkpoint has no lm_head).
    "smollm2": lambda: LlamaConfig(
        **dict(LLAMA_LIKE, hidden_size=72, num_attention_heads=9, num_key_value_heads=3),
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    # A window shorter than the test sequences, so the sliding mask and cache path matter.
    "mistral": lambda: MistralConfig(**LLAMA_LIKE, sliding_window=3),
    "mixtral": lambda: MixtralConfig(
        **dict(LLAMA_LIKE, intermediate_size=32), num_local_experts=4, num_experts_per_tok=2
    ),
    # Layers 2 and 3 slide, 0 and 1 attend to everything: a span 1:3 mixes both kinds.
    "qwen2": lambda: Qwen2Config(
        **LLAMA_LIKE, use_sliding_window=True, sliding_window=3, max_window_layers=2
    ),
    "qwen3": lambda: Qwen3Config(**LLAMA_LIKE, head_dim=16),
    "falcon": lambda: FalconConfig(**COMMON),
    "falcon_alibi": lambda: FalconConfig(**COMMON, alibi=True),
    "bloom": lambda: BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=4, n_head=4),
}
FAMILIES = list(TINY_CONFIGS)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "family" in metafunc.fixturenames:
        metafunc.parametrize("family", FAMILIES)


def build_model(family: str, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[family]())
    return model.eval()


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory: pytest.TempPathFactory):
    """`saved_model(family)` -> (reference model, directory it was saved to); built once."""
    made: dict[str, tuple[PreTrainedModel, Path]] = {}

    def get(family: str) -> tuple[PreTrainedModel, Path]:
        if family not in made:
            model = build_model(family)
            path = tmp_path_factory.mktemp(family)
            model.save_pretrained(path)
            made[family] = (model, path)
        return made[family]

    return get


@pytest.fixture(scope="session")
def hidden_of() -> Callable[..., tuple[torch.Tensor, ...]]:
    return reference_hidden


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return padded_batch()


def reference_hidden(
    model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """Hidden states of the full transformers model: [i] is the input of block i."""
    with torch.no_grad():
        return model(ids, attention_mask=mask, output_hidden_states=True).hidden_states


def padded_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Three sequences of 7 tokens: full, left-padded by 2, left-padded by 4."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 7), generator=gen)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :4] = 0
    return ids, mask


@pytest.fixture(scope="session")
def tiny_model() -> Callable[..., PreTrainedModel]:
    """`tiny_model(family, seed=0)` -> a fresh random-weight reference model."""
    return build_model
