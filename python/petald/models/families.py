"""Which parts of each supported model family stay on the client, and how they run: the layout
table behind `petald.models`. A family's `*ForCausalLM.forward` is embeddings -> decoder blocks
-> final norm -> LM head; the blocks run on the swarm, the rest runs here with the family's own
transformers modules (taken from the model built on the meta device, so e.g. Qwen3's RMSNorm is
Qwen3's). Entry point: `layout_for(config)`, which raises a ValueError naming the architecture
for families petald does not run.

Llama-like families keep `model.embed_tokens` / `model.norm` / `lm_head`; BLOOM keeps
`transformer.word_embeddings` (+ `word_embeddings_layernorm`) / `transformer.ln_f`, Falcon
`transformer.word_embeddings` / `transformer.ln_f`. Gemma's embedding module scales by
sqrt(hidden_size) itself (a non-persistent buffer, rebuilt by `load_local_state`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig


@dataclass(frozen=True)
class Layout:
    """Where the local parts sit in the family's *ForCausalLM (dotted attribute paths)."""

    family: str  # the class name stem: "Llama" -> DistributedLlamaForCausalLM
    embeddings: tuple[str, ...]  # applied in order to the token ids
    norm: str  # the final norm, applied to the last block's output
    lm_head: str = "lm_head"

    @property
    def paths(self) -> tuple[str, ...]:
        return (*self.embeddings, self.norm, self.lm_head)

    def embed(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (batch, seq) -> the first block's input (batch, seq, hidden)."""
        hidden = model.get_submodule(self.embeddings[0])(input_ids)
        for path in self.embeddings[1:]:
            hidden = model.get_submodule(path)(hidden)
        return hidden


_LLAMA_LIKE = dict(embeddings=("model.embed_tokens",), norm="model.norm")
LAYOUTS: dict[str, Layout] = {
    "llama": Layout("Llama", **_LLAMA_LIKE),
    "mistral": Layout("Mistral", **_LLAMA_LIKE),
    "mixtral": Layout("Mixtral", **_LLAMA_LIKE),
    "qwen2": Layout("Qwen2", **_LLAMA_LIKE),
    "qwen3": Layout("Qwen3", **_LLAMA_LIKE),
    "qwen3_moe": Layout("Qwen3Moe", **_LLAMA_LIKE),
    "gemma": Layout("Gemma", **_LLAMA_LIKE),  # its embedding module scales by sqrt(hidden)
    "bloom": Layout(
        "Bloom",
        embeddings=("transformer.word_embeddings", "transformer.word_embeddings_layernorm"),
        norm="transformer.ln_f",
    ),
    "falcon": Layout(
        "Falcon", embeddings=("transformer.word_embeddings",), norm="transformer.ln_f"
    ),
}


def layout_for(config: PretrainedConfig) -> Layout:
    layout = LAYOUTS.get(config.model_type)
    if layout is None:
        raise ValueError(
            f"unsupported architecture: model_type {config.model_type!r}; petald's distributed "
            f"models cover {', '.join(sorted(LAYOUTS))}"
        )
    return layout
