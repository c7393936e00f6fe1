"""Speculative decoding through the distributed model's remote cache (in-process blocks,
petald.testing.local_blocks: the client's code exactly as over a swarm): transformers'
prompt-lookup and assistant-model generation give plain greedy decoding's tokens, and seeded
speculative sampling the local model's. The verification steps roll the session back to the
accepted prefix (`RemoteCache.crop`), which is what these catch when it goes wrong."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from petald.models import DistributedModelForCausalLM
from petald.models.auto import build
from petald.server.loading import load_span
from petald.testing.local_blocks import LocalBlocks
from petald.testing.models import save_tiny_llama

NEW_TOKENS = 20


@pytest.fixture(scope="module")
def models(
    tmp_path_factory,
) -> tuple[DistributedModelForCausalLM, LlamaForCausalLM, LlamaForCausalLM]:
    tmp = tmp_path_factory.mktemp("speculative")
    ref = save_tiny_llama(tmp / "target", layers=4, seed=3)
    draft = save_tiny_llama(tmp / "draft", layers=1, seed=3)  # same vocabulary, weaker
    span = load_span(tmp / "target", (0, 4), progress=False)
    return build(DistributedModelForCausalLM, tmp / "target", LocalBlocks(span)), ref, draft


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    """Repetitive, so that prompt lookup finds drafts (some accepted, some not)."""
    torch.manual_seed(0)
    return torch.randint(1, 128, (1, 6)).repeat(1, 3)


@pytest.mark.parametrize(
    "draft_kind", ["prompt_lookup_4", "prompt_lookup_10", "weak_assistant", "exact_assistant"]
)
@pytest.mark.parametrize("own_session", [False, True])
def test_speculative_greedy_gives_plain_greedy_tokens(models, prompt, draft_kind, own_session):
    """Catches: crop(0) (transformers' "drop nothing" after a fully accepted draft) read as
    "keep nothing" (the next tokens lose their context: other tokens), a rollback that keeps
    rejected draft tokens in the servers' caches, and a session too short for a prompt-lookup
    draft that runs past max_length (an error)."""
    model, ref, draft = models
    if draft_kind.endswith("assistant"):  # the exact one: every draft token is accepted
        kw = {"assistant_model": draft if draft_kind == "weak_assistant" else ref}
    else:
        kw = {"prompt_lookup_num_tokens": int(draft_kind.rsplit("_", 1)[1])}
    want = ref.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    if own_session:
        with model.inference_session(max_length=64) as cache:
            got = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, **kw)
            steps = cache.stats.steps
        if draft_kind != "weak_assistant":  # drafts were accepted: fewer steps than tokens
            assert steps < NEW_TOKENS
    else:
        got = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, **kw)
    assert got.tolist() == want.tolist()


def test_speculative_sampling_matches_the_local_model(models, prompt):
    """Seeded speculative sampling (rejection sampling against the draft) draws the same
    tokens as the local model doing the same: the target's probabilities are the same."""
    model, ref, draft = models
    kw = dict(max_new_tokens=NEW_TOKENS, do_sample=True, temperature=0.9, assistant_model=draft)
    torch.manual_seed(5)
    want = ref.generate(prompt, **kw)
    torch.manual_seed(5)
    got = model.generate(prompt, **kw)
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("kw", [{"prompt_lookup_num_tokens": 4}, {"assistant_model": "exact"}])
def test_speculative_generate_continues_a_held_session(models, prompt, kw) -> None:
    """A second turn: the session already holds the prompt. Assisted generation feeds its
    whole input on its first step; the servers get only the new tokens (the held ones are
    not computed twice) and the tokens are plain greedy's. Catches: the prompt fed again on
    top of the held copy (the session holds it twice: other tokens)."""
    model, ref, _ = models
    if "assistant_model" in kw:  # four draft tokens at first, as prompt lookup here
        kw = {"assistant_model": ref, "num_assistant_tokens": 4}
    want = ref.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    with model.inference_session(max_length=80) as cache:
        model.generate(prompt, max_new_tokens=1, do_sample=False)  # the first turn's prefill
        held = cache.position
        fed: list[int] = []
        step = cache.session.step

        def counting(hidden, *args, **kwargs):
            fed.append(hidden.shape[1])
            return step(hidden, *args, **kwargs)

        cache.session.step = counting
        got = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, **kw)
    assert got.tolist() == want.tolist()
    assert held == prompt.shape[1]
    assert fed[0] <= 1 + 4, fed  # the last token and a draft: not the held prompt again
