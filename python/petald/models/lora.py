"""Client-trained LoRA for the remote blocks: `RemoteLoRA` keeps, for each target linear layer of
a block (e.g. "self_attn.q_proj"), parameters A (blocks, rank, in) and B (blocks, out, rank) on
the client; they travel with every request (`petald.client.Tuning`) and the servers send their
gradients back, so any torch optimizer trains them. Initialised as peft does (A Kaiming-uniform,
B zero: training starts from the unchanged model); scale = alpha / rank.

`save_peft` / `load_peft` use peft's file layout (adapter_config.json + adapter_model.safetensors
with keys `base_model.model.<layers path>.{i}.<target>.lora_A.weight` (rank, in) and
`.lora_B.weight` (out, rank)), so a trained adapter can be served by `petald serve --adapters
DIR` or loaded by peft on the full model. Entry point: `model.add_remote_lora(...)`."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

# As the servers bound it (petald.server.adapters): beyond this a rank is no longer "low".
MAX_RANK = 256
MAX_TARGETS = 8


def block_linears(config: PretrainedConfig) -> tuple[str, dict[str, tuple[int, int]]]:
    """(the path of the model's decoder layer list, e.g. "model.layers"; {linear layer path
    inside a block: (in_features, out_features)}), read from a model built on the meta device
    (no memory, no weights)."""
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    n = config.get_text_config().num_hidden_layers
    for path, module in meta.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            linears = {
                name: (m.in_features, m.out_features)
                for name, m in module[0].named_modules()
                if isinstance(m, nn.Linear)
            }
            return path, linears
    raise ValueError(f"cannot find the decoder layers of a {config.model_type} model")


def _key(target: str) -> str:
    return target.replace(".", "__")  # ParameterDict keys cannot hold dots


class RemoteLoRA(nn.Module):
    def __init__(
        self,
        config: PretrainedConfig,
        targets: Sequence[str],
        *,
        rank: int = 8,
        alpha: float = 16.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        layers_path, linears = block_linears(config)
        targets = list(dict.fromkeys(targets))
        if not 0 < len(targets) <= MAX_TARGETS:
            raise ValueError(f"give 1..{MAX_TARGETS} target layers, e.g. ['self_attn.q_proj']")
        unknown = [t for t in targets if t not in linears]
        if unknown:
            raise ValueError(
                f"{unknown} are not linear layers of a block; they are {list(linears)}"
            )
        if not (isinstance(rank, int) and 0 < rank <= MAX_RANK):
            raise ValueError(f"rank must be an int in 1..{MAX_RANK}")
        self.config, self.layers_path = config, layers_path
        self.targets, self.rank, self.alpha = targets, rank, float(alpha)
        n = config.get_text_config().num_hidden_layers
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        for t in targets:
            fan_in, fan_out = linears[t]
            a = torch.empty(n, rank, fan_in, dtype=dtype, device=device)
            for i in range(n):  # peft's init of lora_A: kaiming_uniform_(a=sqrt(5)) per block
                nn.init.kaiming_uniform_(a[i], a=math.sqrt(5))
            self.A[_key(t)] = nn.Parameter(a)
            self.B[_key(t)] = nn.Parameter(
                torch.zeros(n, fan_out, rank, dtype=dtype, device=device)
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{target: (A (blocks, rank, in), B (blocks, out, rank))}, the parameters themselves."""
        return {t: (self.A[_key(t)], self.B[_key(t)]) for t in self.targets}

    def extra_repr(self) -> str:
        return f"targets={self.targets}, rank={self.rank}, alpha={self.alpha}"

    # ---- peft's layout -----------------------------------------------------------------------

    def save_peft(self, directory: str | Path, base_model: str = "") -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for t, (a, b) in self.weights().items():
            for i in range(a.shape[0]):
                prefix = f"base_model.model.{self.layers_path}.{i}.{t}"
                tensors[f"{prefix}.lora_A.weight"] = a[i].detach().cpu().contiguous()
                tensors[f"{prefix}.lora_B.weight"] = b[i].detach().cpu().contiguous()
        save_file(tensors, directory / "adapter_model.safetensors")
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "target_modules": self.targets,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "inference_mode": True,
        }
        (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return directory

    @classmethod
    def load_peft(
        cls,
        directory: str | Path,
        config: PretrainedConfig,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> RemoteLoRA:
        """A peft LoRA adapter of every block (scale alpha/r; rsLoRA and per-layer ranks are
        not supported and refused)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        meta = json.loads((directory / "adapter_config.json").read_text())
        if meta.get("use_rslora") or meta.get("rank_pattern") or meta.get("alpha_pattern"):
            raise ValueError(f"{directory}: rsLoRA and per-layer ranks are not supported")
        state = load_file(str(directory / "adapter_model.safetensors"))
        pattern = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.(.+)\.lora_([AB])\.weight$")
        found: dict[tuple[str, str, int], torch.Tensor] = {}
        for key, t in state.items():
            if m := pattern.search(key):
                found[(m.group(2), m.group(3), int(m.group(1)))] = t
        targets = sorted({t for t, _, _ in found})
        lora = cls(config, targets, rank=int(meta["r"]), alpha=float(meta["lora_alpha"]))
        n = config.get_text_config().num_hidden_layers
        with torch.no_grad():
            for t, (a, b) in lora.weights().items():
                for i in range(n):
                    if (t, "A", i) not in found or (t, "B", i) not in found:
                        raise ValueError(f"{directory}: {t} has no LoRA weights for block {i}")
                    a[i].copy_(found[(t, "A", i)])
                    b[i].copy_(found[(t, "B", i)])
        return lora.to(device=device, dtype=dtype)
