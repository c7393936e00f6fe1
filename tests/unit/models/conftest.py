"""The distributed models' glue against transformers, without processes: `RemoteSequential` and
its `InferenceSession` are replaced by in-process stand-ins built on the server's own `Span`
(the code that serves blocks). `distributed(family)` -> (distributed model, reference model),
for tiny random-weight models of every family, saved with `save_pretrained` and loaded back
through `petald.models.auto.build` (the path from_pretrained takes after joining the swarm)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    FalconConfig,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

from petald.models import DistributedModelForCausalLM
from petald.models.auto import build
from petald.server.loading import load_span
from petald.testing.family_configs import MORE_FAMILIES, tiny_family_config
from petald.testing.local_blocks import LocalBlocks

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4)
LLAMA_LIKE = dict(COMMON, intermediate_size=96, num_key_value_heads=2)
CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": lambda: LlamaConfig(**LLAMA_LIKE),
    "llama_tied": lambda: LlamaConfig(**LLAMA_LIKE, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**LLAMA_LIKE, sliding_window=3),
    "mixtral": lambda: MixtralConfig(**LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2),
    "qwen2": lambda: Qwen2Config(**LLAMA_LIKE),
    "qwen3": lambda: Qwen3Config(**LLAMA_LIKE, head_dim=16),
    "gemma": lambda: GemmaConfig(**LLAMA_LIKE, head_dim=16),
    "falcon": lambda: FalconConfig(**COMMON),
    "bloom": lambda: BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=3, n_head=4),
}
CONFIGS.update({t: (lambda t=t: tiny_family_config(t)) for t in MORE_FAMILIES})


@pytest.fixture(scope="session")
def distributed(tmp_path_factory: pytest.TempPathFactory):
    made: dict[str, tuple[DistributedModelForCausalLM, PreTrainedModel]] = {}

    def get(family: str) -> tuple[DistributedModelForCausalLM, PreTrainedModel]:
        if family not in made:
            torch.manual_seed(0)
            ref = AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()
            path = tmp_path_factory.mktemp(family)
            ref.save_pretrained(path)
            span = load_span(path, (0, ref.config.num_hidden_layers), progress=False)
            made[family] = (build(DistributedModelForCausalLM, path, LocalBlocks(span)), ref)
        return made[family]

    return get


@pytest.fixture(scope="session")
def local_blocks() -> type[LocalBlocks]:
    """The stand-in class itself (test modules cannot import from conftest)."""
    return LocalBlocks
