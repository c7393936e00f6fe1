"""Families that no petald code names, end to end through real `petald serve` processes: for
each, a tiny random model (petald.testing.family_configs) split over two servers (blocks 0:2
and 2:3), and the distributed model built from the same checkpoint (the family's own class
around remote blocks) against the local transformers model: logits of a left-padded batch
(fp32, within TOL), greedy generate() token for token, and one backward through the swarm (the
input embeddings' gradient) equal to local autograd.

Every family costs two server processes, so the default run takes two that between them cover
soft-capping, sliding windows and a tied head (gemma2), and MoE with an untied head (qwen2_moe);
`just test-families` runs every family of the table (15, in batches of three: about 4 minutes
each on a busy 2-core machine), `PETALD_FAMILIES=a,b` a chosen few. Every family of the installed
transformers is checked without processes by the census (tests/unit/server)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from petald import AutoDistributedModelForCausalLM
from petald.client import ClientConfig, SwarmClient
from petald.testing import Processes
from petald.testing.family_configs import MORE_FAMILIES, padded_batch, tiny_family_config

pytestmark = pytest.mark.slow

TOL = 1e-4
GRAD_TOL = 1e-4  # relative: max |a - b| / max |b|
DEFAULT = ("gemma2", "qwen2_moe")
_chosen = os.environ.get("PETALD_FAMILIES", "")
FAMILIES = (
    list(MORE_FAMILIES) if _chosen == "all" else _chosen.split(",") if _chosen else list(DEFAULT)
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, PreTrainedModel]]:
    out = {}
    for family in FAMILIES:
        torch.manual_seed(5)
        ref = AutoModelForCausalLM.from_config(tiny_family_config(family)).eval()
        path = tmp_path_factory.mktemp("families") / f"tiny-{family}"
        ref.save_pretrained(path)
        out[family] = (path, ref)
    return out


@pytest.fixture(scope="module")
def client(checkpoints, tmp_path_factory) -> Iterator[SwarmClient]:
    tmp = tmp_path_factory.mktemp("families-swarm")
    with Processes() as procs:
        boot = procs.start("node", "--new-swarm", identity=tmp / "boot.key")
        servers = []
        for family, (path, _) in checkpoints.items():
            for blocks in ("0:2", "2:3"):
                args = [str(path), "--blocks", blocks, "--initial-peers", boot.addr]
                args += ["--throughput", "100", "--reachability", "public", "--cache-tokens", "512"]
                key = tmp / f"{family}-{blocks.replace(':', '-')}.key"
                servers.append(procs.spawn("serve", *args, identity=key))
        with ThreadPoolExecutor(len(servers)) as pool:  # they load in parallel
            list(pool.map(lambda d: d.wait_ready(300), servers))
        config = ClientConfig(initial_peers=(boot.addr,), step_timeout=30, request_timeout=60)
        with SwarmClient(config=config) as c:
            yield c


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return padded_batch(7, 2, low=3)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_through_two_servers(family, checkpoints, client) -> None:
    path, ref = checkpoints[family]
    model = AutoDistributedModelForCausalLM.from_pretrained(path, client=client)
    assert isinstance(model, type(ref))
    ids, mask = batch()
    real = mask.bool()
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        want = ref(ids, attention_mask=mask).logits
    assert (got[real] - want[real]).abs().max().item() < TOL

    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert model.generate(ids, **kw).tolist() == ref.generate(ids, **kw).tolist()

    # One backward through both servers: the gradient reaching the input embeddings.
    model.get_input_embeddings().requires_grad_(True)
    ref.get_input_embeddings().requires_grad_(True)
    model(ids[:1], labels=ids[:1]).loss.backward()
    ref(ids[:1], labels=ids[:1]).loss.backward()
    a = model.get_input_embeddings().weight.grad
    b = ref.get_input_embeddings().weight.grad
    assert b.abs().max() > 0
    assert ((a - b).abs().max() / b.abs().max()).item() < GRAD_TOL
