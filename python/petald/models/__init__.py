"""Hugging-Face-compatible models whose decoder blocks run on the swarm: each is the family's own
transformers class with its decoder layers replaced by proxies (`petald.models.remote_layers`),
so embeddings, final norm, LM head and the family's forward stay local; the blocks are a
`petald.client.RemoteSequential` (the research path:
`model.transformer_blocks[3:7]`), and `generate()` keeps its KV cache on the servers
(`RemoteCache`, one inference session; `model.inference_session(...)` continues it across calls).
Entry point: `AutoDistributedModelForCausalLM.from_pretrained(MODEL, initial_peers=[...])`.
Fine-tuning through the swarm (prompts, client LoRA, server adapters; the blocks stay frozen):
`petald.models.finetune`; classifiers: `AutoDistributedModelForSequenceClassification`."""

from petald.models.auto import AutoDistributedModelForCausalLM
from petald.models.cache import RemoteCache
from petald.models.classification import (
    AutoDistributedModelForSequenceClassification,
    DistributedModelForSequenceClassification,
)
from petald.models.families import distributed_class, served_layers
from petald.models.lora import RemoteLoRA
from petald.models.modeling import DistributedModelForCausalLM
from petald.models.tuning import RemoteTuning

__all__ = [
    "AutoDistributedModelForCausalLM",
    "AutoDistributedModelForSequenceClassification",
    "DistributedModelForCausalLM",
    "DistributedModelForSequenceClassification",
    "RemoteCache",
    "RemoteLoRA",
    "RemoteTuning",
    "distributed_class",
    "served_layers",
]


def __getattr__(name: str) -> type:
    """`Distributed<Family>ForCausalLM` for any family class transformers has, e.g.
    `petald.models.DistributedLlamaForCausalLM` (a subclass of `LlamaForCausalLM`)."""
    import transformers

    family = name.removeprefix("Distributed")
    if family != name and family.endswith(("ForCausalLM", "ForSequenceClassification")):
        from petald.models.families import combined_class

        if hasattr(transformers, family):
            return combined_class(getattr(transformers, family))
    raise AttributeError(f"module 'petald.models' has no attribute {name!r}")
