"""The fine-tuning API of the distributed models (`FineTuningMixin`, a base of
`DistributedModelForCausalLM` and the sequence classifier). The remote blocks stay frozen; the
client trains what it holds: prompts, a client LoRA of the remote blocks, and any local module
it unfreezes (embeddings, heads). A standard torch optimizer over `trainable_parameters()` works:

    model = AutoDistributedModelForCausalLM.from_pretrained(
        MODEL, initial_peers=[...], tuning_mode="ptune", pre_seq_len=8)
    lora = model.add_remote_lora(["self_attn.q_proj", "self_attn.v_proj"], rank=8, alpha=16)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    loss = model(ids, labels=ids).loss; loss.backward(); opt.step()
    model.save_remote_lora("my-adapter")   # peft layout: `petald serve MODEL --adapters my-adapter`
    model.active_adapter = "my-adapter"    # later: use the servers' copy by name

Everything lives in one `RemoteTuning` submodule (`model.tuning`, in the state dict as
`tuning.*`), made on first use."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from petald.models.lora import RemoteLoRA
from petald.models.tuning import RemoteTuning

DEFAULT_LORA_TARGETS = ("self_attn.q_proj", "self_attn.v_proj")


class FineTuningMixin:
    """For a PreTrainedModel with `config` and `get_input_embeddings()`."""

    config: object

    @property
    def remote_tuning(self) -> RemoteTuning | None:
        return self._modules.get("tuning")  # type: ignore[attr-defined]

    def _tuning(self) -> RemoteTuning:
        if self.remote_tuning is None:
            text = self.config.get_text_config()  # type: ignore[attr-defined]
            tuning = RemoteTuning(text.num_hidden_layers, text.hidden_size)
            self.add_module("tuning", tuning)  # type: ignore[attr-defined]
        assert self.remote_tuning is not None
        return self.remote_tuning

    def _embedding_weight(self) -> torch.Tensor:
        return self.get_input_embeddings().weight  # type: ignore[attr-defined]

    def enable_prompt_tuning(self, tuning_mode: str = "ptune", pre_seq_len: int = 16) -> None:
        """Trainable prompts of `pre_seq_len` virtual tokens: "ptune" prepends them to the
        input; "deep_ptune" also adds a trainable prompt to every block's input."""
        if self.remote_tuning is not None and self.remote_tuning.mode is not None:
            raise ValueError(f"prompt tuning is already on ({self.remote_tuning.mode})")
        self._tuning().enable_prompts(tuning_mode, pre_seq_len, self._embedding_weight())

    def add_remote_lora(
        self,
        targets: Sequence[str] = DEFAULT_LORA_TARGETS,
        *,
        rank: int = 8,
        alpha: float = 16.0,
    ) -> RemoteLoRA:
        """A LoRA adapter of every remote block, trained on the client: out += alpha/rank *
        x @ A.T @ B.T on each `targets` layer (a linear layer's path inside a block). It goes
        with every request of this model only; other clients never see it."""
        tuning = self._tuning()
        if tuning.lora is not None:
            raise ValueError("this model has a remote LoRA already (model.remote_tuning.lora)")
        weight = self._embedding_weight()
        lora = RemoteLoRA(self.config, targets, rank=rank, alpha=alpha, device=weight.device)  # type: ignore[arg-type]
        tuning.lora = lora
        return lora

    def save_remote_lora(self, directory: str | Path) -> Path:
        """Saves the client LoRA in peft's layout (`petald serve --adapters DIR` serves it)."""
        tuning = self.remote_tuning
        if tuning is None or tuning.lora is None:
            raise ValueError("no remote LoRA to save: add_remote_lora() or load_remote_lora()")
        base = str(getattr(self.config, "name_or_path", ""))
        return tuning.lora.save_peft(directory, base_model=base)

    def load_remote_lora(self, directory: str | Path, *, trainable: bool = True) -> RemoteLoRA:
        """A peft LoRA adapter of all blocks, applied by this client (replaces one it had)."""
        weight = self._embedding_weight()
        lora = RemoteLoRA.load_peft(directory, self.config, device=weight.device)  # type: ignore[arg-type]
        lora.requires_grad_(trainable)
        self._tuning().lora = lora
        return lora

    def remove_remote_lora(self) -> None:
        if self.remote_tuning is not None:
            self.remote_tuning.lora = None

    @property
    def active_adapter(self) -> str | None:
        """The server adapter (`petald serve --adapters`) requests use, by name; requests go
        only to servers that announce it. None: the plain blocks."""
        return self.remote_tuning.active_adapter if self.remote_tuning is not None else None

    @active_adapter.setter
    def active_adapter(self, name: str | None) -> None:
        if name is not None and not (isinstance(name, str) and 0 < len(name) <= 128):
            raise ValueError("active_adapter must be an adapter's name (or None)")
        if name is None and self.remote_tuning is None:
            return
        self._tuning().active_adapter = name

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that require gradients (give these to the optimizer)."""
        return [p for p in self.parameters() if p.requires_grad]  # type: ignore[attr-defined]

    def setup_tuning(
        self,
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        active_adapter: str | None = None,
    ) -> None:
        """from_pretrained's fine-tuning arguments."""
        if tuning_mode is not None:
            self.enable_prompt_tuning(tuning_mode, pre_seq_len)
        elif pre_seq_len:
            raise ValueError("pre_seq_len is the prompt length of tuning_mode='ptune'/'deep_ptune'")
        if active_adapter is not None:
            self.active_adapter = active_adapter
