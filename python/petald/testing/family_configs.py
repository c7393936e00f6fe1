"""Tiny random configs of decoder families that no petald code names, for tests that run them
through the distributed model (the client runs the family's own code around remote blocks, so
each is here for what its forward does outside the layers): soft-capped and scaled logits,
embedding multipliers, tied and untied heads, MoE, sliding windows, per-layer attention kinds,
absolute position embeddings added at the model level, parallel residuals."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
GENERIC = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    **TOKENS,
)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
MORE_FAMILIES: dict[str, dict[str, object]] = {
    "gemma2": dict(final_logit_softcapping=5.0, attn_logit_softcapping=10.0, sliding_window=4),
    "gemma3_text": dict(sliding_window=4, final_logit_softcapping=5.0),  # local/global rotary
    "granite": dict(logits_scaling=4.0, embedding_multiplier=3.0, residual_multiplier=0.5),
    "cohere": dict(logit_scale=0.5),  # logits multiplied, head tied
    "cohere2": dict(sliding_window=4),
    "olmo2": {},
    "olmo3": dict(sliding_window=4),
    "phi3": {},
    "smollm3": {},  # tied head, some layers without rotary (no_rope_layers)
    "starcoder2": {},
    "qwen2_moe": dict(MOE, num_experts=4, shared_expert_intermediate_size=32),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=4),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "gpt2": dict(n_embd=64, n_layer=3, n_head=4),  # learned absolute positions (wpe)
    "gpt_neox": {},  # parallel residual, rotary inside the attention
}


def tiny_family_config(model_type: str, **overrides: object) -> PretrainedConfig:
    """The tiny config of `model_type` (a key of MORE_FAMILIES)."""
    return AutoConfig.for_model(model_type, **{**GENERIC, **MORE_FAMILIES[model_type], **overrides})


def padded_batch(seq: int, pad: int, *, low: int = 1, seed: int = 1) -> tuple[Any, Any]:
    """Two sequences of `seq` token ids in [low, 128), the second left-padded by `pad` (id 0,
    mask 0): (ids, attention_mask)."""
    import torch

    ids = torch.randint(low, 128, (2, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, mask
