"""The one seam between petald and transformers' internals: everything petald takes from
transformers beyond its public top-level API (`from transformers import X`) goes through here,
each use named with why it is needed. tests/unit/test_hf_internals.py pins the behaviour of each
one, and tests/unit/test_layering.py checks that no other module reaches into transformers'
submodules. When a transformers upgrade breaks petald, it breaks here first (`just test-latest`).

Uses, by who needs them:
- Server blocks (`petald.server.families`, `.blocks`): the cache kind of each layer as
  `DynamicCache(config=...)` would build it, whether layers share KV caches, the cache keyword
  of a base model's forward (renamed `past_key_values` -> `cache` in 5.24), a `DynamicCache`
  made of one full-history `DynamicLayer` per served block and a view of it with one layer per
  model block, and the values of non-persistent buffers (the model's own `_init_weights`).
- Server loading (`petald.server.loading`, `.checkpoint`): the causal-LM model-type table,
  transformers' checkpoint conversion rules (renamings and converters that `from_pretrained`
  applies: Mixtral's per-expert weights fused into one tensor, ...), and the GGUF name maps and
  tensor processors (llama.cpp's Q/K permutation undone).
- Client start-up (`petald.cli.preload`): the modules transformers imports lazily (inside its
  functions, or through its lazy modules), imported in the main thread before loading threads
  start, because two threads importing one module graph at once can fail (issue 16).
- Client model (`petald.models`): the name generate() gives the cache in model kwargs and
  outputs (`cache` from 5.24, `past_key_values` before), the hook generate() calls to prepare a
  cache (`_prepare_cache_for_generation`), output dataclasses, and the sequence classification
  loss.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

import torch
import transformers
from torch import nn
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast, SequenceClassifierOutputWithPast
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

# ---- the KV-cache argument, renamed in 5.24 --------------------------------------------------

CACHE_NAMES = ("cache", "past_key_values")  # the current spelling first


def _cache_param(fn: Callable[..., Any], names: tuple[str, ...] = CACHE_NAMES) -> str | None:
    params = inspect.signature(fn).parameters
    return next((n for n in names if n in params), None)


# What generate() and the models' forward call the cache (model kwargs, outputs): 5.24 renamed
# `past_key_values` to `cache` everywhere, with a deprecation shim until 5.40.
GENERATION_CACHE_NAME: str = (
    "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
)


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """The cache a caller passed under either spelling (removed from `kwargs`); both given is
    an error rather than a silent choice."""
    given = {n: kwargs.pop(n) for n in CACHE_NAMES if kwargs.get(n) is not None}
    for n in CACHE_NAMES:
        kwargs.pop(n, None)
    if len(given) > 1:
        raise ValueError("pass the cache as `cache` or `past_key_values`, not both")
    return next(iter(given.values()), None)


# ---- the servers' KV cache --------------------------------------------------------------------


def span_cache(n_layers: int) -> DynamicCache:
    """A cache of `n_layers` plain (full-history) layers: slot i is the span's i-th block. Not
    `DynamicCache(config=...)`, which would give sliding layers that drop old tokens and make
    rollback impossible (the window is applied by the mask instead, which is exact)."""
    kv = DynamicCache()
    kv.layers = [DynamicLayer() for _ in range(n_layers)]
    return kv


def crop_layer(layer: Any, length: int) -> None:
    """Keep the first `length` tokens of one cache layer (rollback of a session)."""
    if not isinstance(layer, DynamicLayer):  # span_cache makes only these
        raise TypeError(f"unexpected cache layer {type(layer).__name__}")
    extra = layer.get_seq_length() - length
    if extra > 0:
        layer.crop(-extra)  # a negative count removes that many tokens from the end


def reorder_layer(layer: Any, indices: torch.Tensor) -> None:
    """Beam search on one cache layer: sequence i becomes the former sequence indices[i]."""
    if layer.is_initialized:
        layer.reorder_cache(indices.to(layer.keys.device))


def cache_layer_types(config: PretrainedConfig) -> list[str]:
    """The cache kind transformers gives each decoder layer (what `DynamicCache(config=...)`
    builds): "full_attention", "sliding_attention", "chunked_attention", "dummy" (layers
    without attention, or that reuse another layer's cache), "linear_attention", "conv",
    "hybrid", ... or a family's own kinds ("mamba", "recurrent", ...)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    kinds, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    return list(kinds)


def shares_kv_across_layers(config: PretrainedConfig) -> bool:
    """Whether some layers attend with another layer's keys and values (Gemma 3n's and Gemma 4's
    KV sharing: `num_kv_shared_layers`, `kv_sharing_modes`)."""
    text = config.get_text_config(decoder=True)
    modes = getattr(text, "kv_sharing_modes", None) or ()
    return "reuse" in modes or bool(getattr(text, "num_kv_shared_layers", 0))


def cache_keyword(forward: Callable[..., Any]) -> str | None:
    """The keyword a forward takes its cache under, if it names one."""
    return _cache_param(forward)


def base_forward_cache_arg(base: nn.Module) -> str | None:
    """The keyword a base model's forward takes its cache under (`cache` from 5.24,
    `past_key_values` before and in some families)."""
    return _cache_param(type(base).forward)


def cache_view(layers: list[Any]) -> DynamicCache:
    """A `DynamicCache` over given cache layers (one per model layer; the same layer object may
    stand at several indices)."""
    kv = DynamicCache()
    kv.layers = layers
    return kv


# ---- loading ----------------------------------------------------------------------------------


def causal_lm_model_types() -> dict[str, str]:
    """model_type -> *ForCausalLM class name, for every causal LM transformers has."""
    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def convert_block_tensors(
    meta: PreTrainedModel, raw: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Checkpoint names and layouts -> the model's, with the conversion rules `from_pretrained`
    applies (renamings, and converters such as Mixtral's per-expert weights fused into one
    tensor), on one block's tensors only."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    rules = get_model_conversion_mapping(meta)
    renamings = [r for r in rules if isinstance(r, WeightRenaming)]
    converters = [r for r in rules if isinstance(r, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    expected = meta.state_dict()  # meta tensors: names and shapes only
    prefix = meta.base_model_prefix
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, Any] = {}
    for key in sorted(raw, key=dot_natural_key):
        target, source_pattern = rename_source_key(key, renamings, converters, prefix, expected)
        if target not in expected and key in expected:
            target, source_pattern = rename_source_key(key, [], [], prefix, expected)
        if source_pattern is None:
            out[target] = raw[key]
            continue
        converter = pending.setdefault(target, copy.deepcopy(by_pattern[source_pattern]))
        ready: Future[torch.Tensor] = Future()  # converters collect futures of loaded tensors
        ready.set_result(raw[key])
        converter.add_tensor(target, key, source_pattern, ready)
    for target, converter in pending.items():
        for name, value in converter.convert(target, model=meta, config=meta.config).items():
            out[name] = value[0] if isinstance(value, list) else value
    return out


class _StateNames:
    """The two things `get_gguf_hf_weights_map` reads from a model: state-dict names and children.
    Walking the real (meta) model instead costs seconds: it rebuilds gguf's name table for every
    submodule."""

    def __init__(self, names: list[str]) -> None:
        self._names = names

    def state_dict(self) -> dict[str, None]:
        return dict.fromkeys(self._names)

    def named_children(self) -> list[tuple[str, Any]]:
        return []


def gguf_processor(arch: str, config: PretrainedConfig) -> Any:
    """transformers' tensor processor for a GGUF file's architecture (`general.architecture`):
    it undoes llama.cpp's layout changes, e.g. the Q/K permutation, and merges MoE experts."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    # The processors read head counts and sizes under HF config names, as to_dict() has them.
    return TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())


def gguf_names(
    names: list[str], prefix: str, processor: Any, config: PretrainedConfig
) -> dict[str, str]:
    """GGUF tensor name -> the model's parameter name among `names`, with transformers' GGUF name
    map. Some checkpoints were converted from the base model (BLOOM's `h.N.*`), so names are
    tried both with and without the base model `prefix`, as transformers does by recursing into
    the base model."""
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    kwargs = dict(model_type=config.model_type, num_layers=config.num_hidden_layers)
    mapping = get_gguf_hf_weights_map(_StateNames(names), processor, **kwargs)
    inner = [n.removeprefix(f"{prefix}.") for n in names if n.startswith(f"{prefix}.")]
    for gguf_name, hf_name in get_gguf_hf_weights_map(
        _StateNames(inner), processor, qual_name=f"{prefix}.", **kwargs
    ).items():
        mapping.setdefault(gguf_name, hf_name)
    return mapping


def rebuild_non_persistent_buffers(
    model: PreTrainedModel, device: torch.device | str, *, within: nn.Module | None = None
) -> None:
    """Gives every non-persistent buffer of `model` (or of `within`, a part of it that is no
    longer reachable from it, e.g. a served layer) still on the meta device (rotary `inv_freq`,
    Gemma's embedding scale, ...) its value on `device`, as `from_pretrained` does for a model
    built on meta: an empty tensor of the buffer's shape and dtype, then the model's own
    `_init_weights` on the module that owns it. Parameters and buffers that already hold values
    are left as they are (transformers' init functions skip tensors flagged
    `_is_hf_initialized`); parameters still on meta stay there."""
    from transformers import initialization

    owners: list[nn.Module] = []
    fresh: set[int] = set()
    for owner in (within or model).modules():
        for name, buffer in list(owner.named_buffers(recurse=False)):
            if buffer.is_meta and name in owner._non_persistent_buffers_set:
                value = torch.empty_like(buffer, device=device)
                owner.register_buffer(name, value, persistent=False)
                fresh.add(id(value))
                if not owners or owners[-1] is not owner:
                    owners.append(owner)
    for owner in owners:
        kept = [
            t for t in (*owner.parameters(), *owner.buffers())
            if id(t) not in fresh and not getattr(t, "_is_hf_initialized", False)
        ]  # fmt: skip
        for t in kept:
            t._is_hf_initialized = True  # type: ignore[attr-defined]
        try:
            with torch.no_grad(), initialization.guard_torch_init_functions():
                model._init_weights(owner)
        finally:
            for t in kept:
                del t._is_hf_initialized  # type: ignore[attr-defined]


# ---- the client model -------------------------------------------------------------------------

# The attention implementation a client model is set to: its layers are remote, so no attention
# runs here, and since transformers has no mask function under this name, the family's forward
# builds no causal masks either (masking_utils' early exit "for custom attention without
# equivalent mask creation": ~1 ms per decode step otherwise, spent on masks no one reads).
REMOTE_ATTENTION = "petald_remote"


def _remote_attention(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("attention runs on the servers: a distributed model has no local layers")


@contextmanager
def remote_attention(config: PretrainedConfig) -> Iterator[None]:
    """While inside, `config` (and its sub-configs) names attention that never runs locally: a
    distributed model's forward runs in this. Only then: a local model built from the same
    config (`LlamaForSequenceClassification(model.config)`) keeps its real attention."""
    from transformers import AttentionInterface

    if REMOTE_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(REMOTE_ATTENTION, _remote_attention)
    before = config._attn_implementation
    config._attn_implementation = REMOTE_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before


def causal_lm_output(
    *,
    loss: torch.Tensor | None,
    logits: torch.Tensor,
    cache: Any,
    hidden_states: tuple[torch.Tensor, ...] | None,
) -> CausalLMOutputWithPast:
    """A *ForCausalLM output; the cache under the name generate() reads back."""
    fields = dict(loss=loss, logits=logits, hidden_states=hidden_states)
    fields[GENERATION_CACHE_NAME] = cache
    return CausalLMOutputWithPast(**fields)


def sequence_classifier_output(
    *, loss: torch.Tensor | None, logits: torch.Tensor, hidden_states: Any
) -> SequenceClassifierOutputWithPast:
    return SequenceClassifierOutputWithPast(loss=loss, logits=logits, hidden_states=hidden_states)


def sequence_classification_loss(
    labels: torch.Tensor, logits: torch.Tensor, config: PretrainedConfig
) -> torch.Tensor:
    """transformers' loss for *ForSequenceClassification (problem type inferred as it does)."""
    from transformers.loss.loss_utils import ForSequenceClassificationLoss

    return ForSequenceClassificationLoss(labels, logits, config)


class RemoteCacheHooks:
    """For a `PreTrainedModel` + `GenerationMixin` whose KV cache lives elsewhere; list it
    first among the bases. generate() calls `_prepare_cache_for_generation` to make a
    `DynamicCache` unless one was given; the model's `check_generation_cache(cache,
    max_cache_length)` sees the cache first (and may size it)."""

    def check_generation_cache(self, cache: Any, max_cache_length: int) -> None:
        raise NotImplementedError

    def _prepare_cache_for_generation(
        self, generation_config: Any, model_kwargs: dict, generation_mode: Any, batch_size: int,
        max_cache_length: int,
    ) -> Any:  # fmt: skip
        self.check_generation_cache(model_kwargs.get(GENERATION_CACHE_NAME), max_cache_length)
        return super()._prepare_cache_for_generation(  # type: ignore[misc]
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
        )


# ---- imports transformers makes lazily ---------------------------------------------------------

LAZY_MODULES = (
    "transformers.generation.utils",  # GenerationMixin.generate
    "transformers.generation.streamers",  # TextStreamer
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "transformers.tokenization_utils_tokenizers",  # TokenizersBackend, PreTrainedTokenizerFast
    "transformers.convert_slow_tokenizer",
    "transformers.modeling_gguf_pytorch_utils",  # a GGUF file's config, tensors, tokenizer
    "transformers.integrations.ggml",
)
# Packages whose every module is imported: transformers' GGUF support is a lazy package whose
# modules the config, tensor and tokenizer readers each reach for separately.
WHOLE_PACKAGES = ("transformers.integrations.gguf",)


def import_lazy_modules(model_types: Iterable[str], tokenizer_class: str | None = None) -> None:
    """Imports what transformers would import lazily when loading a model of one of
    `model_types` and its tokenizer (and `tokenizer_class`, when a checkpoint names one)."""
    from transformers.models.auto import tokenization_auto

    for name in LAZY_MODULES:
        importlib.import_module(name)
    for name in WHOLE_PACKAGES:
        package = importlib.import_module(name)
        for module in pkgutil.iter_modules(package.__path__, prefix=f"{name}."):
            importlib.import_module(module.name)
    for model_type in model_types:
        getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
        if tokenizer := tokenization_auto.TOKENIZER_MAPPING_NAMES.get(model_type):
            tokenization_auto.tokenizer_class_from_name(tokenizer)
    if tokenizer_class:
        tokenization_auto.tokenizer_class_from_name(tokenizer_class)


__all__ = [
    "CACHE_NAMES",
    "GENERATION_CACHE_NAME",
    "RemoteCacheHooks",
    "base_forward_cache_arg",
    "cache_keyword",
    "cache_layer_types",
    "cache_view",
    "causal_lm_model_types",
    "causal_lm_output",
    "convert_block_tensors",
    "crop_layer",
    "gguf_names",
    "gguf_processor",
    "import_lazy_modules",
    "pop_cache",
    "rebuild_non_persistent_buffers",
    "remote_attention",
    "reorder_layer",
    "sequence_classification_loss",
    "sequence_classifier_output",
    "shares_kv_across_layers",
    "span_cache",
]
