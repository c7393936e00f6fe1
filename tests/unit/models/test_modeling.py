"""The distributed model of each family (the family's own class, its layers remote) gives the
transformers model's logits, loss and hidden states for a left-padded batch, and generate()
through a `RemoteCache` (greedy, beam search, seeded sampling) gives its tokens: the families
petald had a table for and fifteen that no petald code names (petald.testing.family_configs).
The blocks run in process here (conftest); tests/swarm/test_models.py runs them on servers."""

from __future__ import annotations

import pytest
import torch

from petald.models import DistributedModelForCausalLM, RemoteCache, served_layers
from petald.models.checkpoint import model_name
from petald.testing.family_configs import MORE_FAMILIES
from petald.testing.family_configs import padded_batch as family_padded_batch

FAMILIES = [
    "llama",
    "llama_tied",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen3",
    "gemma",
    "falcon",
    "bloom",
    *MORE_FAMILIES,
]
TOL = 1e-5


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return family_padded_batch(8, 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_matches_transformers(distributed, family: str) -> None:
    model, ref = distributed(family)
    assert type(model).__name__ == f"Distributed{type(ref).__name__}"
    assert isinstance(model, type(ref))  # the family's own class, its decoder layers remote
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        got = model(ids, attention_mask=mask, labels=ids, output_hidden_states=True)
        want = ref(ids, attention_mask=mask, labels=ids, output_hidden_states=True)
    assert (got.logits[real] - want.logits[real]).abs().max() < TOL
    assert abs(got.loss.item() - want.loss.item()) < TOL
    assert len(got.hidden_states) == len(want.hidden_states)
    for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
        assert (a[real] - b[real]).abs().max() < TOL


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "options",
    [
        dict(do_sample=False),
        dict(do_sample=False, num_beams=3, num_return_sequences=2),
        dict(do_sample=True, temperature=0.7, top_k=30, top_p=0.9, repetition_penalty=1.2),
    ],
    ids=["greedy", "beam", "sampling"],
)
def test_generate_matches_transformers(distributed, family: str, options: dict) -> None:
    model, ref = distributed(family)
    ids, mask = padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=6, pad_token_id=0, **options)
    torch.manual_seed(3)
    got = model.generate(ids, **kw)
    torch.manual_seed(3)
    want = ref.generate(ids, **kw)
    assert got.tolist() == want.tolist()
    assert model.transformer_blocks.sessions[-1].closed  # generate's own session


def test_session_reuses_the_common_prefix(distributed) -> None:
    model, ref = distributed("llama")
    ids = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    with model.inference_session(max_length=40) as session:
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert session.position == 8  # 5 + 4 - 1: the last token was never fed
        longer = torch.cat([out, torch.tensor([[7, 8, 9]])], 1)
        out2 = model.generate(longer, max_new_tokens=4, do_sample=False)
        assert session.session.stats.steps == (1 + 3) + (1 + 3)  # only new tokens computed
        edited = longer.clone()
        edited[0, 2] += 1
        out3 = model.generate(edited, max_new_tokens=4, do_sample=False)
        assert session.position == edited.shape[1] + 3
    assert model.active_session is None
    for prompt, got in [(longer, out2), (edited, out3)]:
        assert got.tolist() == ref.generate(prompt, max_new_tokens=4, do_sample=False).tolist()


def test_remote_cache_bookkeeping(distributed) -> None:
    model, _ = distributed("llama")
    with model.inference_session(max_length=16, batch=2) as cache:
        assert isinstance(cache, RemoteCache) and cache.get_seq_length() == 0
        model(torch.tensor([[1, 2, 3], [4, 5, 6]]), past_key_values=cache)
        cache.reorder_cache(torch.tensor([1, 1]))
        assert cache.token_ids.tolist() == [[4, 5, 6], [4, 5, 6]]
        cache.crop(-1)
        assert cache.get_seq_length() == 2
        with pytest.raises(ValueError, match="batch of 1 sequences; this session is for 2"):
            RemoteCache(model.transformer_blocks, max_length=4, batch=2)._open(1)


def test_unsupported_architecture_is_named() -> None:
    """A family servers cannot run (a state-space model: no per-token KV cache) and one with
    no causal LM class are refused with the reason, before any swarm is joined."""
    from transformers import MambaConfig, T5Config

    from petald.models import distributed_class

    with pytest.raises(ValueError, match=r"unsupported architecture.*mamba"):
        served_layers(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2))
    with pytest.raises(ValueError, match="model_type 't5' has no causal LM class"):
        distributed_class(T5Config(), DistributedModelForCausalLM)


def test_model_name_is_the_servers(tmp_path) -> None:
    (tmp_path / "My-Model").mkdir()
    assert model_name(tmp_path / "My-Model") == "My-Model"
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"")
    assert model_name(gguf) == "SmolLM2-135M-Instruct.Q4_1"
    assert model_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_generate_refuses_a_local_cache(distributed) -> None:
    from transformers import DynamicCache

    model, _ = distributed("llama")
    with pytest.raises(ValueError, match="KV cache of a distributed model is on the servers"):
        model.generate(torch.tensor([[1, 2]]), past_key_values=DynamicCache(), max_new_tokens=2)
    assert isinstance(model, DistributedModelForCausalLM)


def test_stopping_criteria_and_streamer(distributed) -> None:
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Collect:  # generate() only calls put() and end()
        def __init__(self) -> None:
            self.puts: list[list[int]] = []

        def put(self, value: torch.Tensor) -> None:
            self.puts.append(value.reshape(-1).tolist())

        def end(self) -> None:
            self.puts.append([])

    class ThreeNew(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 8, dtype=torch.bool)

    model, ref = distributed("llama")
    ids = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(4))
    streamer = Collect()
    stop = StoppingCriteriaList([ThreeNew()])
    got = model.generate(ids, max_new_tokens=10, stopping_criteria=stop, streamer=streamer)
    want = ref.generate(ids, max_new_tokens=10, stopping_criteria=stop)
    assert got.tolist() == want.tolist() and got.shape[1] == 8
    assert streamer.puts == [ids[0].tolist(), *([t] for t in got[0, 5:].tolist()), []]


def test_a_session_too_short_for_generate_is_refused(distributed) -> None:
    model, _ = distributed("llama")
    with model.inference_session(max_length=8), pytest.raises(ValueError, match="holds 8 tokens"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=10)


def test_local_parts_in_another_dtype(tmp_path, local_blocks) -> None:
    """bfloat16 local parts around float32 blocks: hidden states cross in the local dtype and
    come back in it (what a CUDA client with torch_dtype=bfloat16 does, minus the device), and
    the logits are the float32 transformers model's within bfloat16 rounding. Tolerance: the
    local parts round the embeddings, the blocks' output, the norm and the LM head's weights
    and output to bfloat16, each a relative error of at most eps/2 of what it rounds; the
    logits are dot products of such values with random signs, so their error scales with the
    logits themselves: max|got - ref| <= K * eps(bfloat16) * max|ref|, K = 1.5 (measured on 20
    random inputs: at most 0.70).
    Catches: the remote blocks skipped or one of them dropped, local parts computing in another
    dtype than bfloat16 where it matters (the output dtype)."""
    from petald.models.auto import build
    from petald.server.loading import load_span
    from petald.testing.models import save_tiny_llama

    ref = save_tiny_llama(tmp_path, layers=2)
    span = load_span(tmp_path, (0, 2), progress=False)
    model = build(DistributedModelForCausalLM, tmp_path, local_blocks(span), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    assert got.dtype == torch.bfloat16
    tol = 1.5 * torch.finfo(torch.bfloat16).eps * want.abs().max().item()
    worst = (got.float() - want).abs().max().item()
    assert worst <= tol, f"max |logits - ref| = {worst:.2e} > {tol:.2e}"
