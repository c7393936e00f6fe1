"""What each model family needs around its blocks to run them at arbitrary positions: where the
decoder layers sit in the transformers model, and the per-call inputs that the model's own
`forward` would normally compute before its layer loop (rotary cos/sin, causal and padding masks,
sliding-window masks, ALiBi biases). The entry point is `family_for(model)`, which returns a
`Family` for a model instantiated on the meta device, or raises ValueError for architectures
petald cannot serve. Everything here mirrors the model's own forward in the installed
transformers, so a span reproduces the full model's hidden states exactly.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import Cache, PretrainedConfig, PreTrainedModel

from petald.hf_internals import (
    bloom_alibi,
    bloom_alibi_slopes,
    cached_length,
    causal_mask,
    falcon_alibi,
    kv_length,
    layer_cache_arg,
)

Style = Literal["rotary", "falcon", "bloom"]

# Where decoder-only models keep their blocks, relative to the base model (`model.model`,
# `model.transformer`, ...). The first ModuleList found with num_hidden_layers entries wins.
LAYER_ATTRS = ("layers", "h", "blocks", "decoder.layers")
SUPPORTED_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


@dataclass(frozen=True)
class Family:
    """How to run the blocks of one model: `layers_path` is the ModuleList's name inside the
    *ForCausalLM model (e.g. `model.layers`), `layer_types` has one entry per model layer."""

    style: Style
    config: PretrainedConfig
    layers_path: str
    layer_types: tuple[str, ...]
    rotary: nn.Module | None  # the model's own rotary embedding class, built on the real device
    cache_arg: (
        str  # the keyword the layers take their KV cache under (renamed in transformers 5.24)
    )

    def layer_kwargs(
        self,
        hidden: torch.Tensor,  # (batch, seq, hidden)
        *,
        span_types: tuple[str, ...],  # layer_types of the blocks being run, in order
        first_cache_idx: int,  # cache layer of the first block being run
        attention_mask: torch.Tensor | None,  # (batch, past + seq), 1 = real token
        position_ids: torch.Tensor,  # (batch or 1, seq)
        cache: Cache | None,
    ) -> list[dict[str, Any]]:
        """Keyword arguments for each block's forward, computed once per call like the model's
        own forward does before its layer loop."""
        if self.style == "bloom":
            kw = self._bloom(hidden, first_cache_idx, attention_mask, cache)
            return [kw] * len(span_types)
        if self.style == "falcon":
            kw = self._falcon(hidden, first_cache_idx, attention_mask, position_ids, cache)
            return [kw] * len(span_types)
        masks = {
            # Sized against this call's first cache layer of that kind, as the model does with
            # its first layer: the cache may cover other blocks than the ones run.
            kind: causal_mask(
                self.config,
                hidden,
                attention_mask,
                cache,
                first_cache_idx + span_types.index(kind),
                sliding=kind == "sliding_attention",
                position_ids=position_ids,
            )
            for kind in dict.fromkeys(span_types)
        }
        cos_sin = self._cos_sin(hidden, position_ids)
        return [
            dict(
                attention_mask=masks[kind],
                position_ids=position_ids,
                position_embeddings=cos_sin,
                use_cache=cache is not None,
                **{self.cache_arg: cache},
            )
            for kind in span_types
        ]

    def _cos_sin(
        self, hidden: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        if self.rotary is None:  # family_for builds it for every style but BLOOM's
            raise RuntimeError(f"the {self.style} family has no rotary embedding")
        return self.rotary(hidden, position_ids)

    def _bloom(self, hidden, first, attention_mask, cache) -> dict[str, Any]:
        batch, seq, _ = hidden.shape
        heads = self.config.n_head
        if attention_mask is None:
            # ALiBi only needs key positions 0..kv_length-1; softmax ignores the constant offset.
            kv_len = kv_length(cache, seq, first) if cache is not None else seq
            slopes = bloom_alibi_slopes(heads, hidden.device)
            alibi = slopes[:, None, None] * torch.arange(kv_len, device=hidden.device)
            alibi = alibi.repeat(batch, 1, 1).to(hidden.dtype)  # (batch * heads, 1, kv)
        else:
            alibi = bloom_alibi(attention_mask, heads, hidden.dtype)
        mask = causal_mask(self.config, hidden, attention_mask, cache, first)
        return dict(alibi=alibi, attention_mask=mask, layer_past=cache, use_cache=cache is not None)

    def _falcon(self, hidden, first, attention_mask, position_ids, cache) -> dict[str, Any]:
        batch, seq, _ = hidden.shape
        heads = self.config.num_attention_heads
        past = cached_length(cache, first) if cache is not None else 0
        alibi = None
        if self.config.alibi:
            tokens = attention_mask
            if tokens is None:
                tokens = torch.ones((batch, past + seq), device=hidden.device, dtype=torch.long)
            alibi = falcon_alibi(tokens, heads, hidden.dtype)
        # ALiBi is folded into a materialized mask below: no is-causal shortcut.
        mask = causal_mask(
            self.config, hidden, attention_mask, cache, first, allow_is_causal_skip=False
        )
        if alibi is not None and isinstance(mask, torch.Tensor) and mask.ndim == 4:
            # Falcon adds ALiBi to the attention scores through the mask (sdpa) as FalconModel does.
            lowest = torch.finfo(hidden.dtype).min
            if mask.dtype == torch.bool:
                zero = torch.zeros((), device=mask.device, dtype=hidden.dtype)
                mask = torch.where(mask, zero, lowest)
            alibi = alibi.reshape(batch, -1, *alibi.shape[1:])  # (batch, heads, 1, kv)
            scaled = alibi / math.sqrt(self.config.hidden_size // heads)
            mask = torch.masked_fill(scaled, mask < -1, lowest)
        return dict(
            alibi=alibi,
            attention_mask=mask,
            position_ids=position_ids,
            layer_past=cache,
            use_cache=cache is not None,
            position_embeddings=self._cos_sin(hidden, position_ids),
        )


def family_for(model: PreTrainedModel, device: torch.device) -> Family:
    """The `Family` of a *ForCausalLM model built on the meta device (its layers are found there,
    its rotary embedding is rebuilt on `device` because meta buffers hold no values)."""
    config = model.config
    name = f"{type(model).__name__} (model_type {config.model_type!r})"
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"unsupported architecture {name}: petald serves decoder-only models")
    base = model.base_model
    path, layers = "", None
    for attr in LAYER_ATTRS:
        try:
            found = base.get_submodule(attr)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList) and len(found) == config.num_hidden_layers:
            prefix = model.base_model_prefix if base is not model else ""
            path, layers = (f"{prefix}.{attr}" if prefix else attr), found
            break
    if layers is None:
        raise ValueError(f"unsupported architecture {name}: no decoder layers in a known place")
    layer_types = _layer_types(config)
    if not set(layer_types) <= SUPPORTED_LAYER_TYPES:
        kinds = sorted(set(layer_types) - SUPPORTED_LAYER_TYPES)
        raise ValueError(f"unsupported architecture {name}: layer types {kinds}")
    rotary = getattr(base, "rotary_emb", None)  # on meta: only its class is of use
    style: Style
    if config.model_type == "bloom":
        style = "bloom"
    elif config.model_type == "falcon":
        style = "falcon"
    elif rotary is not None and _takes_position_embeddings(layers[0]):
        style = "rotary"
    else:
        raise ValueError(
            f"unsupported architecture {name}: petald runs blocks that take rotary position "
            "embeddings (Llama, Mistral, Mixtral, Qwen2, Qwen3 and alike), Falcon and BLOOM"
        )
    cache_arg = layer_cache_arg(layers[0])
    if rotary is not None and style != "bloom":
        rotary = type(rotary)(config=config).to(device)
    return Family(style, config, path, layer_types, rotary, cache_arg)


def _takes_position_embeddings(layer: nn.Module) -> bool:
    """Rotary families compute cos/sin once in the model (its `rotary_emb`) and hand them to
    every layer, whose attention applies them: a layer that takes `position_embeddings` is of
    that kind (GPT-NeoX-style layers rotate inside instead)."""
    params = inspect.signature(type(layer).forward).parameters
    return "position_embeddings" in params


def _layer_types(config: PretrainedConfig) -> tuple[str, ...]:
    """Attention kind of each layer, as the model's forward picks its mask: `layer_types` when the
    config has it (Qwen2/3), else sliding everywhere when a window is set (Mistral)."""
    types = getattr(config, "layer_types", None)
    if types:
        return tuple(types)
    sliding = getattr(config, "sliding_window", None) is not None
    return ("sliding_attention" if sliding else "full_attention",) * config.num_hidden_layers
