"""Every causal-LM family of the installed transformers, as a tiny random model
(`petald.testing.census`): its blocks are served exactly (forward on a left-padded batch, blocks
0:2 then 2:4, a cached prefill and two steps: within 1e-5 of the transformers model's last
decoder-layer output, float32), and run exactly by the client around those blocks (logits
within 1e-4, greedy tokens through an inference session), or refused with a ValueError. A wrong
answer or any other exception fails. The README's "Model support" table is this census:
`python -m petald.testing.census` prints it."""

from __future__ import annotations

import pytest
import torch
import transformers

from petald.testing import census

# Families that must stay served (a regression guard: a refusal here is a lost family), and
# some that must stay refused, with why.
MUST_SERVE = {
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2",
    "gemma3_text", "olmo2", "olmo3", "phi3", "granite", "gpt_oss", "doge", "llama4_text",
    "gpt2", "gpt_neox", "gpt_bigcode", "opt", "mpt", "bloom", "falcon", "modernbert-decoder",
}  # fmt: skip
MUST_REFUSE = {"mamba": "KV cache", "falcon_h1": "KV cache", "bert": "decoder layers"}


@pytest.fixture(autouse=True, scope="module")
def _quiet_and_one_thread():
    # Tiny tensors: a second OpenMP thread only adds synchronisation (3x slower on 2 busy cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity_warning()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("model_type", census.model_types())
def test_family_is_served_exactly_or_refused(model_type, tmp_path):
    outcome = census.check(model_type, tmp_path / model_type)  # AssertionError if served wrong
    if model_type in MUST_SERVE:
        assert outcome.status == "served", outcome
    if model_type in MUST_REFUSE:
        assert outcome.status == "refused" and MUST_REFUSE[model_type] in outcome.reason
    assert outcome.status in ("served", "refused", "unbuildable")
