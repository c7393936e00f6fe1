"""Hugging-Face-compatible models whose decoder blocks run on the swarm: embeddings, final norm
and LM head stay local, the blocks are a `petald.client.RemoteSequential` (the research path:
`model.transformer_blocks[3:7]`), and `generate()` keeps its KV cache on the servers
(`RemoteCache`, one inference session; `model.inference_session(...)` continues it across calls).
Entry point: `AutoDistributedModelForCausalLM.from_pretrained(MODEL, initial_peers=[...])`.
Fine-tuning through the swarm (prompts, client LoRA, server adapters; the blocks stay frozen):
`petald.models.finetune`; classifiers: `AutoDistributedModelForSequenceClassification`."""

from petald.models.auto import FAMILY_CLASSES, AutoDistributedModelForCausalLM
from petald.models.cache import RemoteCache
from petald.models.classification import (
    AutoDistributedModelForSequenceClassification,
    DistributedModelForSequenceClassification,
)
from petald.models.families import LAYOUTS, Layout, layout_for
from petald.models.lora import RemoteLoRA
from petald.models.modeling import DistributedModelForCausalLM
from petald.models.tuning import RemoteTuning

DistributedLlamaForCausalLM = FAMILY_CLASSES["llama"]
DistributedMistralForCausalLM = FAMILY_CLASSES["mistral"]
DistributedMixtralForCausalLM = FAMILY_CLASSES["mixtral"]
DistributedQwen2ForCausalLM = FAMILY_CLASSES["qwen2"]
DistributedQwen3ForCausalLM = FAMILY_CLASSES["qwen3"]
DistributedQwen3MoeForCausalLM = FAMILY_CLASSES["qwen3_moe"]
DistributedGemmaForCausalLM = FAMILY_CLASSES["gemma"]
DistributedBloomForCausalLM = FAMILY_CLASSES["bloom"]
DistributedFalconForCausalLM = FAMILY_CLASSES["falcon"]

__all__ = [
    "LAYOUTS",
    "AutoDistributedModelForCausalLM",
    "AutoDistributedModelForSequenceClassification",
    "DistributedBloomForCausalLM",
    "DistributedFalconForCausalLM",
    "DistributedGemmaForCausalLM",
    "DistributedLlamaForCausalLM",
    "DistributedMistralForCausalLM",
    "DistributedMixtralForCausalLM",
    "DistributedModelForCausalLM",
    "DistributedModelForSequenceClassification",
    "DistributedQwen2ForCausalLM",
    "DistributedQwen3ForCausalLM",
    "DistributedQwen3MoeForCausalLM",
    "Layout",
    "RemoteCache",
    "RemoteLoRA",
    "RemoteTuning",
    "layout_for",
]
