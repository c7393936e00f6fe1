"""`AutoDistributedModelForSequenceClassification`: a classifier on the same remote body as the
causal LM. The client keeps the embeddings, the final norm and a `score` head (hidden ->
num_labels, no bias, as transformers' *ForSequenceClassification); the blocks stay on the swarm.
Pooling is transformers': the logits of each sequence's last non-pad token (right or left
padding), which needs `config.pad_token_id` for batches of more than one sequence. The loss is
transformers' (`problem_type` regression / single / multi label, inferred from the labels).

Only client-side parts train: the score head is trainable (newly initialised: a causal LM
checkpoint has none), everything else frozen until opted in; prompts and a client LoRA work as
for the causal LM (`petald.models.finetune`). Built from the causal LM's loaded parts, so it
accepts from_pretrained's arguments (`petald.models.auto.load`) plus `num_labels`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from petald.hf_internals import sequence_classification_loss, sequence_classifier_output
from petald.models.auto import load
from petald.models.modeling import DistributedModelForCausalLM


class DistributedModelForSequenceClassification(DistributedModelForCausalLM):
    def __init__(self, config: Any, transformer_blocks: Any, local_modules: dict) -> None:
        super().__init__(config, transformer_blocks, local_modules)
        *parents, leaf = self.layout.lm_head.split(".")
        delattr(self.get_submodule(".".join(parents)), leaf)  # a placeholder: no LM head here
        text = config.get_text_config()
        self.score = nn.Linear(text.hidden_size, config.num_labels, bias=False)
        std = getattr(text, "initializer_range", 0.02)
        nn.init.normal_(self.score.weight, std=std)  # as transformers' _init_weights

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, source: str | Path, *, num_labels: int = 2, **kwargs: Any
    ) -> DistributedModelForSequenceClassification:
        causal = load(DistributedModelForCausalLM, source, **kwargs)
        try:
            config = causal.config
            config.num_labels = num_labels
            local = {p: causal.get_submodule(p) for p in causal.layout.paths}
            local[causal.layout.lm_head] = nn.Identity()
            model = cls(config, causal.transformer_blocks, local)
            embed = model.get_input_embeddings().weight
            model.score.to(embed.device, embed.dtype)
            if causal.remote_tuning is not None:
                model.add_module("tuning", causal.remote_tuning)
        except BaseException:
            causal.close()
            raise
        model._client, causal._client = causal._client, None
        model.eval()
        return model

    @property
    def lm_head_module(self) -> nn.Module:
        return self.score

    def get_output_embeddings(self) -> None:  # type: ignore[override]
        return None

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("a sequence classifier does not generate; use the causal LM class")

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """As transformers' LlamaForSequenceClassification.forward (stateless)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.layout.embed(self, input_ids)
        out, hidden_states = self._run_blocks(
            inputs_embeds, attention_mask, position_ids, bool(output_hidden_states)
        )
        out = self.get_submodule(self.layout.norm)(out)
        if hidden_states is not None:
            hidden_states = (*hidden_states[:-1], out)
        logits = self.score(out)  # (batch, seq, labels)
        batch = logits.shape[0]
        pad = self.config.pad_token_id
        if pad is None and batch != 1:
            raise ValueError("batches need config.pad_token_id to find each sequence's end")
        if pad is None or input_ids is None:
            last = torch.full((batch,), -1, device=logits.device)
        else:
            # The rightmost non-pad token (left or right padding), as transformers does.
            real = (input_ids != pad).to(logits.device, torch.int32)
            index = torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32)
            last = (index * real).argmax(-1)
        pooled = logits[torch.arange(batch, device=logits.device), last]
        loss = None
        if labels is not None:
            loss = sequence_classification_loss(labels, pooled, self.config)
        return sequence_classifier_output(loss=loss, logits=pooled, hidden_states=hidden_states)


class AutoDistributedModelForSequenceClassification:
    """The family's classifier from a causal LM checkpoint served by the swarm."""

    @classmethod
    def from_pretrained(
        cls, source: str | Path, **kwargs: Any
    ) -> DistributedModelForSequenceClassification:
        return DistributedModelForSequenceClassification.from_pretrained(source, **kwargs)
