"""How a span runs its blocks with the family's own code: the model's base forward (`LlamaModel`,
`GPT2Model`, ...) computes the per-call inputs of its layers (masks, rotary cos/sin, ALiBi,
per-layer attention kinds), and a `Runner` stands in its decoder-layer list so that only the
span's real layers compute. Entry points: `family_for(model)` checks, on the *ForCausalLM built on
the meta device, that its layers are self-contained (or raises ValueError naming why not), and
`Runner(family, ...)` takes over that meta model for one span.

A call runs the base forward on `inputs_embeds` = the incoming hidden states (for their shape,
dtype and device only) with the span's mask, positions and a cache view. Each entry of the layer
list is a `_Proxy`: those before the call's range hand their input on untouched; the first one in
range drops the hidden state it is handed (the forward may have scaled or normalized its
`inputs_embeds`, e.g. Gemma's normalizer or Granite's multiplier: that is the client's part) and
calls its real layer on the true incoming activation, with exactly the arguments the forward
passed; the last one in range stops the forward (`_Done`), so the final norm never runs. Modules
of the base model outside the layers (embeddings, final norm: never loaded, left on meta) are
`_Outside` stubs that return NaN: a value the first in-range proxy discards, and one that shows
up if the forward feeds it to a layer (checked when a span is loaded, `Runner.probe`).
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from petald.hf_internals import (
    base_forward_cache_arg,
    cache_layer_types,
    rebuild_non_persistent_buffers,
    shares_kv_across_layers,
)
from petald.server.adapters import add_prompt

# What decoder-only models call their list of blocks (`model.layers`, `transformer.h`,
# `model.decoder.layers`, ...): the shallowest ModuleList of num_hidden_layers entries so named.
LAYER_NAMES = ("layers", "h", "blocks")
# Cache kinds whose state is a per-token KV cache that a span can hold, roll back and reorder
# (sliding and chunked layers keep their whole history; their mask applies the window). "dummy":
# layers without attention (MLP-only), which hold no cache.
SERVED_CACHE_KINDS = frozenset(
    {"full_attention", "sliding_attention", "chunked_attention", "dummy"}
)


class Unsupported(ValueError):
    """The model's forward does not treat its layers as self-contained blocks."""


@dataclass(frozen=True)
class Family:
    """What `family_for` found: `layers_path` is the decoder-layer list's name inside the
    *ForCausalLM model (e.g. `model.layers`); the forward that runs them is that of the module
    holding the list (`owner_path`, e.g. `model`: a `LlamaModel`; `model.decoder` for OPT);
    `cache_kinds` is the cache kind of each model layer, `cache_arg` the keyword that forward
    takes its cache under."""

    name: str  # for messages: class and model_type
    config: PretrainedConfig
    model: PreTrainedModel  # on the meta device
    layers_path: str
    owner_path: str
    cache_kinds: tuple[str, ...]
    cache_arg: str


def family_for(model: PreTrainedModel) -> Family:
    """The `Family` of a *ForCausalLM model built on the meta device, or ValueError saying why
    petald cannot serve its blocks."""
    config = model.config
    name = f"{type(model).__name__} (model_type {config.model_type!r})"

    def refuse(why: str) -> Unsupported:
        return Unsupported(f"unsupported architecture {name}: {why}")

    if getattr(config, "is_encoder_decoder", False):
        raise refuse("petald serves decoder-only models")
    path = find_layers(model)
    if path is None:
        raise refuse("no list of decoder layers where decoder-only models keep them")
    owner_path = path.rpartition(".")[0]
    if not owner_path:
        raise refuse("the causal LM has no base model whose forward runs the layers")
    kinds = tuple(cache_layer_types(config))
    text = config.get_text_config(decoder=True)
    if getattr(text, "hidden_size_per_layer_input", 0) or getattr(text, "altup_num_inputs", 0):
        raise refuse(
            "its layers take per-layer inputs computed from the token ids, or several hidden "
            "streams (Gemma 3n/4 per-layer embeddings, AltUp): a block is not self-contained"
        )
    if shares_kv_across_layers(config):
        raise refuse("layers share one KV cache across layers (a block is not self-contained)")
    if not set(kinds) <= SERVED_CACHE_KINDS:
        unserved = sorted(set(kinds) - SERVED_CACHE_KINDS)
        raise refuse(f"layer kinds {unserved} keep state that is not a per-token KV cache")
    owner = model.get_submodule(owner_path)
    if "inputs_embeds" not in inspect.signature(type(owner).forward).parameters:
        raise refuse(f"{type(owner).__name__}, which runs its layers, takes no inputs_embeds")
    cache_arg = base_forward_cache_arg(owner)
    if cache_arg is None:
        raise refuse(f"{type(owner).__name__}.forward takes no KV cache")
    return Family(name, config, model, path, owner_path, kinds, cache_arg)


def find_layers(model: nn.Module) -> str | None:
    """The dotted path of a model's list of decoder layers, or None."""
    n = getattr(model.config, "num_hidden_layers", None)
    found = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) == n
        and name.rpartition(".")[2] in LAYER_NAMES
    ]
    return min(found, key=lambda name: name.count("."), default=None)


class _Done(Exception):  # control flow, not an error
    """Raised by the last in-range layer: the forward stops there (no final norm)."""

    def __init__(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden


@dataclass
class _Call:
    """One call's state, read by the proxies. `start`/`end`: model block indices."""

    start: int
    end: int
    incoming: torch.Tensor
    prompts: torch.Tensor | None
    position: int
    outputs: list[torch.Tensor] | None
    probe: bool = False
    last: torch.Tensor | None = None
    leaks: list[str] = field(default_factory=list)


class _Proxy(nn.Module):
    """Stands for model layer `index` in the base model's layer list; attributes the forward
    reads from its layers (`attention_type`, ...) come from the layer it stands for."""

    def __init__(self, runner: Runner, index: int, layer: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_runner", runner)  # not submodules: the span owns its layers
        object.__setattr__(self, "_layer", layer)
        self._index = index

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._runner.layer_call(self._index, args, kwargs)

    # Straight to forward: nn.Module's call machinery (hooks) costs microseconds per proxy,
    # and a forward calls every proxy of the model, however few blocks a span serves.
    __call__ = forward


class _Proxies(nn.ModuleList):
    """The proxies as the model's layer list. Forwards loop over `self.layers[:n]`: a slice is a
    plain list here (nn.ModuleList would build a new ModuleList, registering each module, on
    every call)."""

    def __getitem__(self, idx: Any) -> Any:
        if isinstance(idx, slice):
            return list(self._modules.values())[idx]
        return super().__getitem__(idx)


class _Outside(nn.Module):
    """A module of the base model outside the blocks (embedding, final norm, ...), left on
    meta. Called, it returns NaN: an Embedding a scalar (its output is added to the hidden
    state), anything else the shape of its input (its last dimension `out_features` if it has
    them)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        object.__setattr__(self, "_module", module)
        self._dtype = dtype

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_module"), name)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        device = first.device if first is not None else torch.device("cpu")
        if isinstance(self._module, nn.Embedding) or first is None:
            return torch.full((), float("nan"), dtype=self._dtype, device=device)
        out = getattr(self._module, "out_features", first.shape[-1])
        return torch.full((*first.shape[:-1], out), float("nan"), dtype=self._dtype, device=device)


class Runner:
    """Runs model blocks [start, end) of a span (`layers`: the span's real layers, the first
    one being model block `first`) through the family's base forward. It takes over the meta
    model of `family`: its layer list becomes proxies, the modules outside the layers `_Outside`
    stubs, and its non-persistent buffers (rotary frequencies, ...) are rebuilt on `device`."""

    def __init__(
        self,
        family: Family,
        layers: list[nn.Module],
        first: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.family = family
        self.first = first
        self.layers = layers
        self.returns_tuple = False  # learned from the real layers: do they return (hidden, ...)?
        self._call: _Call | None = None  # the proxies read the running call's state here,
        self._lock = threading.Lock()  # so a span runs one call at a time
        base = family.model.get_submodule(family.owner_path)
        attr = family.layers_path.removeprefix(f"{family.owner_path}.")
        meta_layers = base.get_submodule(attr)
        end = first + len(layers)
        proxies = [
            _Proxy(self, i, layers[i - first] if first <= i < end else layer)
            for i, layer in enumerate(meta_layers)
        ]
        _set_submodule(base, attr, _Proxies(proxies))
        for name, module in _outside_modules(base):
            _set_submodule(base, name, _Outside(module, dtype))
        rebuild_non_persistent_buffers(family.model, device)
        self.base = base

    def run(
        self,
        hidden: torch.Tensor,  # (batch, seq, hidden)
        start: int,
        end: int,
        *,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: Any,  # a cache view with one layer per model block, or None
        prompts: torch.Tensor | None = None,
        position: int = 0,
        outputs: list[torch.Tensor] | None = None,
        probe: bool = False,
    ) -> torch.Tensor:
        """The output of model blocks [start, end) for `hidden`, the input of block `start`.
        `probe`: the forward gets NaN embeddings, and any NaN reaching a layer's other inputs
        raises Unsupported (they would be computed from outside the blocks)."""
        call = _Call(start, end, hidden, prompts, position, outputs, probe)
        nan = float("nan")
        kwargs = {
            # Not `hidden` itself: forwards may scale their embeddings in place (CTRL).
            "inputs_embeds": torch.full_like(hidden, nan) if probe else torch.empty_like(hidden),
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "use_cache": cache is not None,
            self.family.cache_arg: cache,
        }
        with self._lock:
            self._call = call
            try:
                self.base(**kwargs)
            except _Done as done:
                return done.hidden
            finally:
                self._call = None
        raise Unsupported(
            f"unsupported architecture {self.family.name}: its forward returned without "
            f"running block {end - 1}"
        )

    def layer_call(self, index: int, args: tuple, kwargs: dict[str, Any]) -> Any:
        call = self._call
        if call is None:
            raise RuntimeError("a petald proxy layer was called outside Runner.run")
        if "hidden_states" in kwargs:
            handed = kwargs.pop("hidden_states")
        else:
            handed, args = args[0], args[1:]
        if index < call.start:  # not run in this call: its input passes through
            return (handed,) if self.returns_tuple else handed
        if index >= call.end:
            raise RuntimeError(f"block {index} called after the last one of the call")
        if index == call.start:
            hidden = call.incoming
        elif handed is call.last:
            hidden = handed
        else:
            raise Unsupported(
                f"unsupported architecture {self.family.name}: its forward changes the hidden "
                "state between layers, or carries more than it from layer to layer"
            )
        if call.probe:
            _check_no_nan(self.family.name, index, args, kwargs)
        if call.prompts is not None:
            hidden = add_prompt(hidden, call.prompts[index - call.start], call.position)
        out = self.layers[index - self.first](hidden, *args, **kwargs)
        self.returns_tuple = isinstance(out, tuple)
        hidden = out[0] if isinstance(out, tuple) else out
        if call.outputs is not None:
            call.outputs.append(hidden)
        if index == call.end - 1:
            raise _Done(hidden)
        call.last = hidden
        return out


def _check_no_nan(name: str, index: int, args: tuple, kwargs: dict[str, Any]) -> None:
    """Probe calls feed NaN embeddings and NaN from every module outside the blocks: a layer
    input holding NaN was computed from them, which the span does not have."""
    found = [k for k, v in (*enumerate(args), *kwargs.items()) if _has_nan(v)]
    if found:
        raise Unsupported(
            f"unsupported architecture {name}: its forward passes block {index} inputs "
            f"{found} computed from the embeddings or other weights outside the blocks"
        )


def _has_nan(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and bool(torch.isnan(value).any())
    if isinstance(value, tuple | list):
        return any(_has_nan(v) for v in value)
    if isinstance(value, dict):
        return any(_has_nan(v) for v in value.values())
    return False


def _outside_modules(base: nn.Module) -> list[tuple[str, nn.Module]]:
    """The topmost modules of `base` outside its layer list that hold parameters (on meta),
    looking inside plain containers; the module that runs the layers is `base` itself."""
    found = []

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, _Proxy) or not any(True for _ in child.parameters()):
                continue
            if isinstance(child, nn.ModuleList | nn.ModuleDict | nn.Sequential):
                walk(f"{path}.", child)
            else:
                found.append((path, child))

    walk("", base)
    return found


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    if isinstance(owner, nn.ModuleList | nn.Sequential):
        owner[int(leaf)] = module
    else:
        setattr(owner, leaf, module)
