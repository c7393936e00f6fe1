"""Pins what petald takes from transformers' internals (`petald.hf_internals`), one test per use,
so that an upgrade that changes one fails here by name; and checks that nothing else in petald,
its tests or benches reaches past transformers' public top-level API."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from transformers import (
    DynamicCache,
    GenerationMixin,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MixtralConfig,
    MixtralForCausalLM,
)

from petald import hf_internals as hf
from petald.testing.models import tiny_config_kwargs

REPO = Path(__file__).resolve().parents[2]
SEAM = REPO / "python/petald/hf_internals.py"
# Private names of transformers that only the seam may use.
PRIVATE = (
    "_prepare_cache_for_generation",
    "_get_alibi_slopes",
    "_supports_sdpa",
    "_init_weights",
)
LLAMA = tiny_config_kwargs(layers=2, hidden=32, intermediate=48, vocab=64)


def test_only_the_seam_reaches_into_transformers() -> None:
    bad = []
    for path in sorted([*REPO.glob("python/**/*.py"), *REPO.glob("tests/**/*.py")]):
        if path == SEAM:
            continue
        bad += [f"{path.relative_to(REPO)}:{n}" for n in _internal_uses(path) if n]
    for path in sorted(REPO.glob("bench/*.py")):
        bad += [f"{path.relative_to(REPO)}:{n}" for n in _internal_uses(path) if n]
    assert not bad, "transformers internals outside petald.hf_internals: " + ", ".join(bad)


def _internal_uses(path: Path, strings: bool | None = None) -> list[int]:
    """Lines that import a transformers submodule, name one in a string (sys.modules, lazy
    imports) or use a private transformers name."""
    this_file = path.resolve() == Path(__file__).resolve()  # its own PRIVATE list is no use
    # Tests may name modules in strings (to watch imports); code may not (to reach them).
    if strings is None:
        strings = path.is_relative_to(REPO / "python") or path.is_relative_to(REPO / "bench")
    lines = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and strings:
            names = [node.value]
        if any(n.startswith("transformers.") or n in PRIVATE for n in names):
            lines.add(node.lineno)
        attr = getattr(node, "attr", None) if not this_file else None
        if attr in PRIVATE or (isinstance(node, ast.FunctionDef) and node.name in PRIVATE):
            lines.add(node.lineno)
    return sorted(lines)


def test_the_check_sees_each_kind_of_use(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import transformers.cache_utils\n"
        "from transformers.masking_utils import create_causal_mask\n"
        "import sys\nm = sys.modules['transformers.models.bloom.modeling_bloom']\n"
        "class M:\n    def _prepare_cache_for_generation(self): ...\n"
        "x = m._get_alibi_slopes\n"
        "from transformers import DynamicCache\n"
    )
    assert _internal_uses(probe, strings=True) == [1, 2, 4, 6, 7]
    assert _internal_uses(probe, strings=False) == [1, 2, 6, 7]  # a test may name modules


# ---- the cache argument ------------------------------------------------------------------------


def test_generation_cache_name_is_what_the_model_returns() -> None:
    model = LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()
    with torch.no_grad():
        out = model(torch.tensor([[1, 2, 3]]), use_cache=True)
    assert isinstance(out[hf.GENERATION_CACHE_NAME], DynamicCache)
    assert hf.GENERATION_CACHE_NAME in inspect.signature(model.forward).parameters
    got = hf.causal_lm_output(loss=None, logits=out.logits, cache="c", hidden_states=None)
    assert got[hf.GENERATION_CACHE_NAME] == "c"


def test_pop_cache_takes_either_spelling_not_both() -> None:
    for name in hf.CACHE_NAMES:
        kwargs = {name: "c", "other": 1}
        assert hf.pop_cache(kwargs) == "c" and kwargs == {"other": 1}
    assert hf.pop_cache({"cache": None, "past_key_values": None}) is None
    with pytest.raises(ValueError, match="not both"):
        hf.pop_cache({"cache": "a", "past_key_values": "b"})


# ---- the servers' blocks ----------------------------------------------------------------------


def test_cache_layer_types_and_kv_sharing() -> None:
    from transformers import Gemma3nTextConfig, MambaConfig, Qwen3NextConfig

    assert hf.cache_layer_types(LlamaConfig(**LLAMA)) == ["full_attention"] * 2
    mistral = MistralConfig(**LLAMA, sliding_window=4)
    assert hf.cache_layer_types(mistral) == ["sliding_attention"] * 2
    assert "linear_attention" in hf.cache_layer_types(Qwen3NextConfig(num_hidden_layers=4))
    assert set(hf.cache_layer_types(MambaConfig(num_hidden_layers=2))) - {"full_attention"}
    assert not hf.shares_kv_across_layers(LlamaConfig(**LLAMA))
    assert hf.shares_kv_across_layers(
        Gemma3nTextConfig(num_hidden_layers=4, num_kv_shared_layers=2)
    )


def test_base_forward_cache_arg_and_cache_view() -> None:
    model = LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()
    name = hf.base_forward_cache_arg(model.model)
    assert name in hf.CACHE_NAMES
    kv = hf.span_cache(1)
    view = hf.cache_view([kv.layers[0], kv.layers[0]])  # block 1's layer stands in for block 0
    with torch.no_grad():
        model.model(inputs_embeds=torch.randn(1, 3, 32), use_cache=True, **{name: view})
    # Layer 1 wrote through the view into the one real layer (layer 0 too: both are one object).
    assert kv.layers[0].get_seq_length() == 6 and view.get_seq_length() == 6


def test_rollback_and_beam_reorder_of_a_cache_layer() -> None:
    kv = hf.span_cache(1)
    keys = torch.arange(2 * 5, dtype=torch.float).reshape(2, 1, 5, 1)  # (batch, heads, seq, dim)
    kv.update(keys, keys.clone(), 0)
    layer = kv.layers[0]
    hf.crop_layer(layer, 3)
    assert layer.get_seq_length() == 3 and torch.equal(layer.keys, keys[:, :, :3])
    hf.crop_layer(layer, 4)  # longer than held: nothing to do
    assert layer.get_seq_length() == 3
    hf.reorder_layer(layer, torch.tensor([1, 1]))
    assert torch.equal(layer.keys[0], keys[1, :, :3])
    with pytest.raises(TypeError):
        hf.crop_layer(object(), 0)


# ---- loading -----------------------------------------------------------------------------------


def test_rebuild_non_persistent_buffers_gives_from_pretrained_values() -> None:
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    gemma = dict(LLAMA, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    for config in (LlamaConfig(**LLAMA), Gemma3TextConfig(**gemma)):
        reference = AutoModelForCausalLM.from_config(config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        # Gemma's scaled embedding owns a buffer and a parameter: a loaded parameter stays.
        embed = model.get_input_embeddings()
        weight = torch.randn(embed.weight.shape)
        embed.weight = torch.nn.Parameter(weight.clone())
        hf.rebuild_non_persistent_buffers(model, "cpu")
        buffers = dict(model.named_buffers())
        assert buffers.keys() == dict(reference.named_buffers()).keys()
        for name, value in reference.named_buffers():
            assert torch.equal(buffers[name], value), name
        assert torch.equal(embed.weight, weight)
        assert not hasattr(embed.weight, "_is_hf_initialized")
        assert model.model.layers[0].self_attn.q_proj.weight.is_meta  # parameters stay on meta


def test_remote_attention_builds_no_masks_and_runs_no_attention() -> None:
    """Inside `remote_attention` the forward builds no masks for its (remote) layers, even with
    padding and explicit positions, and a local attention call fails loudly; after it, the
    config names its own attention again (a local model built from it must work)."""
    model = LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()
    own = model.config._attn_implementation
    seen: list[object] = []
    model.model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    ids = torch.tensor([[0, 0, 5, 6], [3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    positions = torch.tensor([[1, 1, 0, 1], [0, 1, 2, 3]])
    with (
        hf.remote_attention(model.config),
        pytest.raises(RuntimeError, match="attention runs on the servers"),
    ):
        model(ids, attention_mask=mask, position_ids=positions)
    assert seen == [None]
    assert model.config._attn_implementation == own
    model(ids, attention_mask=mask, position_ids=positions)  # its own attention, a real mask
    assert seen[1] is not None


def test_causal_lm_model_types() -> None:
    types = hf.causal_lm_model_types()
    assert types["llama"] == "LlamaForCausalLM" and types["mixtral"] == "MixtralForCausalLM"


def test_convert_block_tensors_fuses_mixtral_experts(tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    config = MixtralConfig(**LLAMA, num_local_experts=2, num_experts_per_tok=1)
    torch.manual_seed(0)
    MixtralForCausalLM(config).save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    raw = {k: v for k, v in saved.items() if k.startswith("model.layers.0.")}
    assert any(".experts.0." in k for k in raw)  # the checkpoint has one tensor per expert
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    got = hf.convert_block_tensors(meta, raw)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    want = {k: v for k, v in loaded.state_dict().items() if k.startswith("model.layers.0.")}
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_gguf_maps_of_the_real_model() -> None:
    config = LlamaConfig(**dict(LLAMA, num_hidden_layers=30))
    processor = hf.gguf_processor("llama", config)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.norm.weight", "lm_head.weight"]
    mapping = hf.gguf_names(names, "model", processor, config)
    assert mapping["blk.0.attn_q.weight"] == names[0]
    assert mapping["output_norm.weight"] == "model.norm.weight"


# ---- the client model --------------------------------------------------------------------------


def test_lazy_modules_are_imported() -> None:
    import sys

    hf.import_lazy_modules(["llama"], "PreTrainedTokenizerFast")
    assert set(hf.LAZY_MODULES) <= sys.modules.keys()
    assert "transformers.models.llama.modeling_llama" in sys.modules


def test_sequence_classification_loss() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    config = LlamaConfig(**LLAMA, num_labels=2)
    got = hf.sequence_classification_loss(labels, logits, config)
    assert torch.allclose(got, torch.nn.functional.cross_entropy(logits, labels))
    out = hf.sequence_classifier_output(loss=got, logits=logits, hidden_states=None)
    assert out.loss is got and out.logits is logits


def test_generate_still_prepares_its_cache_through_the_hook() -> None:
    params = list(inspect.signature(GenerationMixin._prepare_cache_for_generation).parameters)
    assert params == [
        "self",
        "generation_config",
        "model_kwargs",
        "generation_mode",
        "batch_size",
        "max_cache_length",
    ]
    assert "_prepare_cache_for_generation" in inspect.getsource(GenerationMixin.generate)
