"""The model-support census: for every causal-LM model type of the installed transformers, a tiny
random model (`tiny_config`: one generic recipe, plus the fields some families need), saved with
`save_pretrained`, whose blocks `load_span` either serves exactly (the same last-block output as
the transformers model on a left-padded batch, through blocks 0:2 then 2:4, and step by step
with a KV cache) or refuses with a ValueError. Anything else — another exception, or an answer
off by more than `ATOL` — is a failure. tests/unit/server/test_families_census.py runs it per
model type; `python -m petald.testing.census` prints the README's "Model support" table.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from petald.hf_internals import causal_lm_model_types
from petald.server import load_span

ATOL = 1e-5  # float32
LOGITS_ATOL = 1e-4  # float32 logits: larger than hidden states (a vocabulary-wide projection)
MAX_PARAMETERS = 12_000_000  # a tiny model; bigger ones are sub-configs left at their defaults
VOCAB = 256
LAYERS = 4
GENERIC: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    # Mixture-of-experts families, under their various names: few small experts.
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
)
DROP = object()  # in SPECIAL: leave this generic field out
# Multi-head latent attention (DeepSeek V2/V3 and alike): low-rank query and KV projections.
MLA: dict[str, Any] = dict(
    kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    head_dim=DROP, num_key_value_heads=4, n_shared_experts=1, first_k_dense_replace=1,
    n_group=1, topk_group=1,
)  # fmt: skip
# Decoders of encoder-decoder families, used alone as causal LMs (BartForCausalLM, ...).
SEQ2SEQ: dict[str, Any] = dict(
    d_model=64, decoder_layers=LAYERS, encoder_layers=LAYERS, decoder_attention_heads=4,
    encoder_attention_heads=4, decoder_ffn_dim=96, encoder_ffn_dim=96, num_hidden_layers=DROP,
)  # fmt: skip
# Fields some families need on top of (or instead of) the generic ones.
SPECIAL: dict[str, dict[str, Any]] = {
    **dict.fromkeys(
        ["deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe_lite", "glm_moe_dsa", "minicpm3",
         "sarvam_mla", "longcat_flash", "beam", "axk1", "axk2", "dots1", "youtu"],
        MLA,
    ),
    **dict.fromkeys(
        ["bart", "mbart", "marian", "mvp", "pegasus", "plbart", "blenderbot", "blenderbot-small",
         "bigbird_pegasus"],
        SEQ2SEQ,
    ),
    "falcon": dict(head_dim=DROP),
    "gptj": dict(rotary_dim=8),
    "codegen": dict(rotary_dim=8),
    "gpt_neo": dict(attention_types=[[["global", "local"], LAYERS // 2]]),
    "gemma4_text": dict(vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=0),
    "dbrx": dict(
        d_model=64, n_heads=4, n_layers=LAYERS,
        attn_config=dict(kv_n_heads=2, rope_theta=1e4, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=96, moe_num_experts=4, moe_top_k=2),
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Outcome:
    """ "served", "refused" (reason: the ValueError) or "unbuildable" (no tiny model: reason)."""

    status: str
    reason: str = ""


def model_types() -> list[str]:
    return sorted(causal_lm_model_types())


def tiny_config(model_type: str) -> PretrainedConfig:
    kwargs = {**GENERIC, **SPECIAL.get(model_type, {})}
    return AutoConfig.for_model(model_type, **{k: v for k, v in kwargs.items() if v is not DROP})


def build(model_type: str, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32).eval()


def screen(model_type: str, workdir: Path) -> Outcome | None:
    """What is known from the config alone: a recipe that gives no tiny model, or a family that
    `load_span` refuses before reading any tensor (then only config.json is saved and no random
    model built: some take seconds)."""
    from petald.server.families import family_for

    config = tiny_config(model_type)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    if (size := meta.num_parameters()) > MAX_PARAMETERS:
        return Outcome("unbuildable", f"the tiny recipe gives {size / 1e6:.0f}M parameters")
    try:
        family_for(meta)
        return None
    except ValueError:
        config.save_pretrained(workdir)
    try:
        load_span(workdir, (0, LAYERS), progress=False)
    except ValueError as e:
        return Outcome("refused", _one_line(e).removeprefix("unsupported architecture "))
    raise AssertionError(f"{model_type}: load_span served a family that family_for refuses")


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences of 6 tokens, the second left-padded by 2."""
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    return ids, mask


def layer_io(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """[input of block 0, output of block 0, ..., output of the last block] of the transformers
    model (before its final norm), caught with hooks on its decoder layers."""
    layers = _decoder_layers(model)
    seen: list[torch.Tensor] = []

    def first_input(_module: Any, args: tuple, kwargs: dict) -> None:
        seen.append(args[0] if args else kwargs["hidden_states"])

    def output(_module: Any, _args: Any, out: Any) -> None:
        seen.append(out[0] if isinstance(out, tuple) else out)

    hooks = [layer.register_forward_hook(output) for layer in layers]
    if len(layers):
        hooks.append(layers[0].register_forward_pre_hook(first_input, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _decoder_layers(model: PreTrainedModel) -> Any:
    """The decoder-layer list where petald looks for it, or [] (the family is refused then)."""
    from petald.server.families import find_layers

    path = find_layers(model)
    return model.get_submodule(path) if path is not None else []


def check(model_type: str, workdir: Path) -> Outcome:
    """Builds, saves and serves one family; raises AssertionError if a span is served wrong."""
    ids, mask = batch()
    try:
        if known := screen(model_type, workdir):
            return known
        model = build(model_type)
        model.save_pretrained(workdir)
    except Exception as e:  # what the generic recipe cannot build
        return Outcome("unbuildable", _one_line(e))
    failed = None
    try:
        io = layer_io(model, ids, mask)
    except Exception as e:  # the tiny transformers model itself does not run
        failed = Outcome("unbuildable", _one_line(e))
    try:
        span = load_span(workdir, (0, LAYERS), progress=False)
    except ValueError as e:
        reason = _one_line(e).removeprefix("unsupported architecture ")
        reason = reason.replace(str(workdir), "the checkpoint")
        # A static refusal holds whatever the tiny model does; one that ran it needs it to run.
        return failed if failed and "its forward fails" in reason else Outcome("refused", reason)
    if failed:
        return failed
    real = mask.bool()

    def close(what: str, actual: torch.Tensor, expected: torch.Tensor, keep: torch.Tensor) -> None:
        err = (actual[keep] - expected[keep]).abs().max().item()
        assert err <= ATOL, f"{model_type} served wrong ({what}): max error {err:.3g}"

    with torch.no_grad():
        close("forward", span(io[0], attention_mask=mask), io[-1], real)
        half = LAYERS // 2  # as two servers would split the model
        middle = span(io[0], end_block=half, attention_mask=mask)
        close("split", span(middle, start_block=half, attention_mask=mask), io[-1], real)
        cache = span.new_cache(2, 8)
        outs = [span.step(io[0][:, :4], cache, 0, attention_mask=mask[:, :4])]
        for pos in (4, 5):
            x = io[0][:, pos : pos + 1]
            outs.append(span.step(x, cache, pos, attention_mask=mask[:, : pos + 1]))
        close("cached steps", torch.cat(outs, dim=1), io[-1], real)
    return check_client(model_type, model, workdir, span)


def check_client(model_type: str, model: PreTrainedModel, workdir: Path, span: Any) -> Outcome:
    """The client half of a served family: the distributed model (the family's own class, its
    layers remote) around the span gives the transformers model's logits on a left-padded
    batch and its greedy tokens through a KV-cache session; or the client refuses the family
    (a ValueError) with the reason."""
    from petald.models import DistributedModelForCausalLM
    from petald.models.auto import build as build_client
    from petald.testing.local_blocks import LocalBlocks

    ids, mask = batch()
    try:
        client = build_client(DistributedModelForCausalLM, workdir, LocalBlocks(span))
    except ValueError as e:
        return Outcome("refused", "client: " + _one_line(e).replace(str(workdir), "the checkpoint"))
    real = mask.bool()
    with torch.no_grad():
        got, want = client(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
    err = (got[real] - want[real]).abs().max().item()
    assert err <= LOGITS_ATOL, f"{model_type} client logits wrong: max error {err:.3g}"
    kw = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    got_ids, want_ids = client.generate(ids, **kw), model.generate(ids, **kw)
    assert got_ids.tolist() == want_ids.tolist(), f"{model_type} client generates other tokens"
    return Outcome("served")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if not isinstance(e, ValueError) else text


def table(outcomes: dict[str, Outcome]) -> str:
    """The README's table: model type -> served / refused: reason."""
    rows = ["| model type | support |", "| --- | --- |"]
    for model_type, o in sorted(outcomes.items()):
        reason = re.sub(r"^\S+ \(model_type '[^']+'\): ", "", o.reason)  # the row says it
        cell = o.status if o.status == "served" else f"{o.status}: {reason}"
        rows.append(f"| `{model_type}` | {cell.replace('|', '/')} |")
    counts = {s: sum(o.status == s for o in outcomes.values()) for s in ("served", "refused")}
    counts["unbuildable"] = len(outcomes) - counts["served"] - counts["refused"]
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    return f"transformers {transformers.__version__}: {summary}.\n\n" + "\n".join(rows)


def main() -> None:
    import tempfile

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)  # tiny tensors
    outcomes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model_type in sys.argv[1:] or model_types():
            try:
                outcomes[model_type] = check(model_type, Path(tmp) / model_type)
            except Exception as e:
                outcomes[model_type] = Outcome("FAILED", _one_line(e))
            print(model_type, outcomes[model_type], file=sys.stderr, flush=True)
    print(table(outcomes))


if __name__ == "__main__":
    main()
