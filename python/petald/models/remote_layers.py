"""The decoder-layer list of a family's own transformers model, replaced by proxies to the swarm.
This is how a distributed model runs any family's code: the family's `forward` (embedding
multipliers, position embeddings added at the model level, final norm, logit scaling and
soft-capping, tied heads, its loss and its pooling) runs here unchanged, and where its layer loop
calls decoder layer i, `LayerProxy` i answers with what the remote blocks computed. Entry point:
`RemoteLayers.install(model, layers_path)`, then `with layers.call(run, every): model(...)`.

The first proxy a forward reaches sends its input through every remote block at once (one
round trip per route, not per block); the others hand on what came back: with `every`, proxy i
returns block i's output (so `output_hidden_states` and autograd see each block), else the last
block's output is returned by the first proxy and passed through unchanged by the rest. That is
exact only for loops that carry nothing but the hidden state from one layer to the next, the
same condition under which servers can run the blocks one span at a time
(`petald.server.families` refuses the other families, and so does the client before joining)."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, get_type_hints

import torch
from torch import nn

# (first block's input) -> (last block's output, every block's output stacked or None)
BlockRun = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class _Call:
    """One forward's state: how to run the blocks, and what the proxies have seen so far."""

    run: BlockRun
    every: bool
    block_input: torch.Tensor | None = None
    outputs: torch.Tensor | None = None  # (blocks, batch, seq, hidden) with `every`
    last: torch.Tensor | None = None
    handed: torch.Tensor | None = None  # what the last proxy returned
    calls: int = 0


class RemoteLayers:
    """Shared by a model's proxies (not a module: it holds no weights and no state dict)."""

    def __init__(self, n_layers: int, returns_tuple: bool) -> None:
        self.n_layers = n_layers
        self.returns_tuple = returns_tuple
        self._call: _Call | None = None
        self._probe: list[torch.Tensor] | None = None

    def probe(self, base: nn.Module) -> bool:
        """Runs the family's loop once on the meta device (free: the model's weights are still
        there) to see how it hands one layer's output to the next: a tensor as is, or a tuple
        it takes [0] of. Sets `returns_tuple` and returns True, or False if the forward does not
        run on meta or has one layer (the guess from its source then stands)."""
        if self.n_layers < 2:
            return False
        self._probe = []
        ids = torch.zeros((1, 2), dtype=torch.long, device="meta")
        try:
            base(input_ids=ids, use_cache=False)
        except _ProbeDone as done:
            self.returns_tuple = done.returns_tuple
            return True
        except Exception:  # ops that need values, families that need other inputs
            return False
        finally:
            self._probe = None
        return False

    @classmethod
    def install(cls, model: nn.Module, layers_path: str, base: nn.Module) -> RemoteLayers:
        """Replaces the ModuleList at `layers_path` (e.g. `model.layers`) with proxies; `base`
        is the module whose forward loops over them."""
        old = model.get_submodule(layers_path)
        if not isinstance(old, nn.ModuleList) or len(old) == 0:
            raise ValueError(f"{layers_path} is not a list of decoder layers")
        remote = cls(len(old), _returns_tuple(base, old[0]))
        proxies = _Proxies([LayerProxy(i, remote) for i in range(len(old))])
        parent_path, _, name = layers_path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, proxies)
        return remote

    @contextmanager
    def call(self, run: BlockRun, every: bool) -> Iterator[_Call]:
        """The forward inside runs the blocks with `run` (exactly once, checked on exit)."""
        if self._call is not None:
            raise RuntimeError("a distributed model's forward is not reentrant")
        state = self._call = _Call(run, every)
        try:
            yield state
        finally:
            self._call = None
        if state.calls != self.n_layers:
            # A loop that skips or repeats layers (e.g. early exit) would silently mix blocks.
            raise RuntimeError(
                f"the model's forward called {state.calls} of its {self.n_layers} decoder layers"
            )

    def layer(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        if self._probe is not None:  # the first proxy returns a tensor; what reaches the next?
            if index == 0:
                self._probe.append(hidden)
                return hidden
            raise _ProbeDone(returns_tuple=hidden is not self._probe[0])
        call = self._call
        if call is None:
            raise RuntimeError("decoder layer proxies run only inside the distributed forward")
        if index != call.calls:
            raise RuntimeError(f"decoder layer {index} called out of order")
        call.calls += 1
        if index == 0:
            call.block_input = hidden
            call.last, call.outputs = call.run(hidden)
            call.handed = call.outputs[0] if call.outputs is not None else call.last
            return call.handed
        if hidden is not call.handed:
            # The loop changed what a layer returned before handing it to the next (or took
            # a tuple apart differently): the blocks, run in one pass, would not see that.
            raise ValueError(
                "unsupported architecture: the model's forward changes the hidden state "
                "between its decoder layers"
            )
        if call.outputs is not None:
            call.handed = call.outputs[index]
        return call.handed  # without `every`, the first proxy returned the last block's output


class _ProbeDone(Exception):  # control flow, not an error
    def __init__(self, returns_tuple: bool) -> None:
        self.returns_tuple = returns_tuple


class LayerProxy(nn.Module):
    """Stands where decoder layer `index` was; takes whatever the family's loop passes."""

    def __init__(self, index: int, remote: RemoteLayers) -> None:
        super().__init__()
        self.index = index
        self.remote = remote  # a plain attribute: RemoteLayers is not a module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor):
            raise RuntimeError(f"decoder layer {self.index} was not given a hidden-state tensor")
        out = self.remote.layer(self.index, hidden)
        return (out,) if self.remote.returns_tuple and self.remote._probe is None else out

    # Straight to forward: a decode step calls every proxy, and nn.Module's call machinery
    # (hooks) costs microseconds each.
    __call__ = forward

    def extra_repr(self) -> str:
        return f"remote block {self.index}"


class _Proxies(nn.ModuleList):
    """The proxies as the family's layer list. Forwards loop over `self.layers[:n]`: a slice is
    a plain list here (nn.ModuleList's builds a new ModuleList, registering every module, on
    each call: ~1 ms per decode step for a 30-layer model)."""

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return list(self._modules.values())[index]
        return super().__getitem__(index)


def _returns_tuple(base: nn.Module, layer: nn.Module) -> bool:
    """Whether the family's loop expects a tuple from each layer and takes its [0]: read from
    the loop in the base model's forward (`outputs = block(...)`, then `outputs[0]`), else from
    what the layer's forward is annotated to return."""
    try:
        source = inspect.getsource(type(base).forward)
    except (OSError, TypeError):
        source = ""
    loop = re.search(r"for (?:\w+, )?(\w+) in (?:enumerate\()?self\.", source)
    if loop is not None:
        call = re.search(rf"(\w+) = {loop.group(1)}\(", source)
        if call is not None:
            name = call.group(1)
            return name != "hidden_states" and f"{name}[0]" in source
    forward = type(layer).forward
    try:
        returned = get_type_hints(forward).get("return")
    except Exception:  # unresolvable annotations (forward references to optional imports)
        returned = inspect.signature(forward).return_annotation
    text = returned if isinstance(returned, str) else repr(returned)
    return text.lower().startswith(("tuple", "typing.tuple", "<class 'tuple"))
