"""`AutoDistributedModelForSequenceClassification`: the family's own *ForSequenceClassification
(`Distributed<Family>ForSequenceClassification`) on the same remote body as the causal LM. The
client keeps the embeddings, the final norm and the family's `score` head (hidden -> num_labels);
the blocks stay on the swarm. Pooling and loss are the family's: the logits of each sequence's
last non-pad token (right or left padding), which needs `config.pad_token_id` for batches of more
than one sequence; `problem_type` regression / single / multi label, inferred from the labels.

Only client-side parts train: the score head is trainable (newly initialised: a causal LM
checkpoint has none), everything else frozen until opted in; prompts and a client LoRA work as
for the causal LM (`petald.models.finetune`). Accepts from_pretrained's arguments
(`petald.models.auto.load`) plus `num_labels`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from petald.models.modeling import DistributedModelForCausalLM


class DistributedModelForSequenceClassification(DistributedModelForCausalLM):
    head_name = "sequence classification"

    @staticmethod
    def auto_mapping() -> Any:
        from transformers import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

        return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, source: str | Path, *, num_labels: int = 2, **kwargs: Any
    ) -> DistributedModelForSequenceClassification:
        from petald.models.auto import load

        if not (isinstance(num_labels, int) and num_labels > 0):
            raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
        model = load(cls, source, config_updates=dict(num_labels=num_labels), **kwargs)
        return model  # type: ignore[return-value]

    def load_local_state(
        self, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
    ) -> None:
        """As the causal LM's, with a new `score` head (a causal LM checkpoint has none),
        initialised as transformers' _init_weights does, and trainable."""
        score = self.get_submodule("score")
        text = self.config.get_text_config()
        std = getattr(text, "initializer_range", 0.02)
        fresh = {}
        for name, param in score.named_parameters():
            value = torch.zeros(param.shape, device=device, dtype=dtype)
            if name == "weight":
                nn.init.normal_(value, std=std)
            fresh[f"score.{name}"] = value
        super().load_local_state({**state, **fresh}, device, dtype)
        score.requires_grad_(True)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("a sequence classifier does not generate; use the causal LM class")


class AutoDistributedModelForSequenceClassification:
    """The family's classifier from a causal LM checkpoint served by the swarm."""

    @classmethod
    def from_pretrained(
        cls, source: str | Path, **kwargs: Any
    ) -> DistributedModelForSequenceClassification:
        return DistributedModelForSequenceClassification.from_pretrained(source, **kwargs)
