"""Per-request additions to served blocks, for fine-tuning through the swarm:

- `LoRA`: low-rank deltas `out += scale * x @ A.T @ B.T` on some linear layers of each block, for
  one request only. A client's adapter travels with its request (trained on the client, never
  stored here, never seen by another request: hooks live for one call and the compute process
  runs one request at a time); a server's own adapters (`--adapters DIR...`, peft layout) are
  loaded once and picked per request by name.
- Deep prompts: a trainable vector per block and prompt position, added to the block's input at
  positions [0, pre_seq_len) (deep prompt tuning).

On the wire (petald.server.handlers) such tensors follow the regular ones, named in the header's
`"named"` list: "prompts" (blocks, batch|1, pre_seq_len, hidden) and "lora.<target>.A" (blocks,
rank, in) / "lora.<target>.B" (blocks, out, rank), where <target> is a linear layer's path inside
a block, e.g. "self_attn.q_proj"."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# Bounds on what a client may attach: a rank beyond this is no longer "low", and every target is
# one hook per block per request.
MAX_LORA_RANK = 256
MAX_LORA_TARGETS = 8
_TARGET = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


@dataclass
class LoRA:
    """weights[target] = (A (blocks, rank, in), B (blocks, out, rank)); block j of the tensors is
    the j-th block of the range it is applied to."""

    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scale: float

    def slice(self, start: int, end: int) -> LoRA:
        return LoRA(
            {t: (a[start:end], b[start:end]) for t, (a, b) in self.weights.items()}, self.scale
        )


def linear_of(block: nn.Module, target: str) -> nn.Module:
    """The linear layer at `target` inside `block` (bitsandbytes layers count: they subclass
    nn.Linear), or ValueError."""
    if not _TARGET.match(target):
        raise ValueError(f"bad LoRA target {target!r}")
    try:
        module = block.get_submodule(target)
    except AttributeError:
        raise ValueError(f"LoRA target {target!r} is not a layer of this model's blocks") from None
    if not isinstance(module, nn.Linear):
        raise ValueError(f"LoRA target {target!r} is a {type(module).__name__}, not a linear layer")
    return module


def check_lora(lora: LoRA, blocks: Sequence[nn.Module]) -> None:
    """Shapes against the layers they will be added to; raises ValueError with what is wrong."""
    if not 0 < len(lora.weights) <= MAX_LORA_TARGETS:
        raise ValueError(f"a LoRA adapter has 1..{MAX_LORA_TARGETS} targets")
    if not (isinstance(lora.scale, float | int) and abs(lora.scale) <= 1e4):
        raise ValueError("lora_scale must be a number of magnitude <= 1e4")
    for target, (a, b) in lora.weights.items():
        linear = linear_of(blocks[0], target)
        n, rank = len(blocks), a.shape[1] if a.dim() == 3 else -1
        want_a = (n, rank, linear.in_features)
        want_b = (n, linear.out_features, rank)
        if not 0 < rank <= MAX_LORA_RANK or tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise ValueError(
                f"LoRA {target}: A must be (blocks={n}, rank<={MAX_LORA_RANK}, "
                f"{linear.in_features}) and B ({n}, {linear.out_features}, rank); got "
                f"{tuple(a.shape)} and {tuple(b.shape)}"
            )
        if not (a.dtype.is_floating_point and b.dtype.is_floating_point):
            raise ValueError(f"LoRA {target}: A and B must be floating-point tensors")


@contextmanager
def applied(blocks: Sequence[nn.Module], lora: LoRA | None) -> Iterator[None]:
    """Adds `lora` to `blocks` for the duration of the block: forward hooks, removed however the
    block ends, so nothing of one request stays for the next."""
    handles = []
    try:
        if lora is not None:
            for j, block in enumerate(blocks):
                for target, (a, b) in lora.weights.items():
                    hook = _hook(a[j], b[j], lora.scale)
                    handles.append(linear_of(block, target).register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _hook(a: torch.Tensor, b: torch.Tensor, scale: float):
    def add_delta(_module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        delta = (x.to(a.dtype) @ a.to(x.device).T) @ b.to(x.device).T  # (..., rank) -> (..., out)
        return out + scale * delta.to(out.dtype)

    return add_delta


def add_prompt(hidden: torch.Tensor, prompt: torch.Tensor, start: int) -> torch.Tensor:
    """`hidden` holds positions [start, start + seq); adds `prompt` (batch|1, p, hidden) to the
    positions it shares with [0, p). Out of place, so autograd sees it."""
    p, seq = prompt.shape[1], hidden.shape[1]
    if start >= p:
        return hidden
    end = min(p, start + seq)
    delta = prompt[:, start:end].to(device=hidden.device, dtype=hidden.dtype)
    return hidden + F.pad(delta, (0, 0, 0, seq - (end - start)))  # (batch|1, seq, hidden)


def load_peft_adapter(directory: Path, blocks: range, block_modules: Sequence[nn.Module]) -> LoRA:
    """A LoRA adapter saved by peft (adapter_config.json + adapter_model.safetensors), for the
    served blocks only (the others' tensors are never read)."""
    from safetensors import safe_open

    config = json.loads((directory / "adapter_config.json").read_text())
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    scale = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
    pattern = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.(.+)\.lora_([AB])\.weight$")
    found: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            m = pattern.search(key)
            if m is None or int(m.group(1)) not in blocks:
                continue
            target, which = m.group(2), m.group(3)
            found.setdefault(target, {}).setdefault(which, {})[int(m.group(1))] = f.get_tensor(key)
    if not found:
        raise ValueError(f"{directory}: no LoRA weights for blocks {blocks.start}:{blocks.stop}")
    weights = {}
    for target, ab in found.items():
        if set(ab.get("A", {})) != set(blocks) or set(ab.get("B", {})) != set(blocks):
            raise ValueError(f"{directory}: {target} lacks LoRA weights for some served blocks")
        a = torch.stack([ab["A"][i] for i in blocks])
        b = torch.stack([ab["B"][i] for i in blocks])
        weights[target] = (a, b)
    lora = LoRA(weights, scale)
    check_lora(lora, block_modules)
    return lora


def split_named(
    header: dict, tensors: list[torch.Tensor]
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """(the regular tensors, the named ones): the last len(header["named"]) tensors are named.
    The daemon checked the names' form and count; shapes are checked against the blocks."""
    names = header.get("named") or []
    if not names:
        return tensors, {}
    return tensors[: -len(names)], dict(zip(names, tensors[-len(names) :], strict=True))


def from_named(
    named: dict[str, torch.Tensor], scale: float
) -> tuple[torch.Tensor | None, LoRA | None]:
    """(deep prompts, client LoRA) from the named tensors of a request."""
    prompts = named.get("prompts")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in named.items():
        if name.startswith("lora."):
            target, _, which = name[len("lora.") :].rpartition(".")
            pairs.setdefault(target, {})[which] = t
    if any(set(ab) != {"A", "B"} for ab in pairs.values()):
        raise ValueError("every LoRA target needs both lora.<target>.A and lora.<target>.B")
    lora = LoRA({t: (ab["A"], ab["B"]) for t, ab in pairs.items()}, float(scale)) if pairs else None
    return prompts, lora
