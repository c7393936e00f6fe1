"""The distributed models against real `petald serve` processes and the local transformers
model with the same weights. One module-scoped swarm holds two models: a tiny random Llama of 4
blocks (servers A = 0:2, B = 2:4) and the real SmolLM2-135M-Instruct GGUF (0:15 and 15:30).

Checks (fp32, tolerance TOL on logits and hidden states): a left-padded batch's logits, loss
and every block's hidden states; greedy, beam-search and seeded sampling generate() token for
token; a session continued across generate() calls (multi-turn) and a sliced research path;
and SmolLM2 answering the chat-templated question with exactly the local model's text."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, TextStreamer

from petald import AutoDistributedModelForCausalLM
from petald.client import ClientConfig, SwarmClient
from petald.models import DistributedLlamaForCausalLM, DistributedModelForCausalLM
from petald.testing import DaemonProcess, Processes
from petald.testing.models import save_tiny_llama, smollm2_gguf

pytestmark = pytest.mark.slow

TOL = 1e-4
TINY = "tiny-llama-4"
SERVERS = {
    "tiny-A": (TINY, "0:2"),
    "tiny-B": (TINY, "2:4"),
    "smol-A": ("smol", "0:15"),
    "smol-B": ("smol", "15:30"),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM]:
    path = tmp_path_factory.mktemp("models") / TINY
    return path, save_tiny_llama(path, layers=4, seed=3)


@pytest.fixture(scope="module")
def swarm(tiny, tmp_path_factory) -> Iterator[DaemonProcess]:
    tmp = tmp_path_factory.mktemp("models-swarm")
    sources = {TINY: str(tiny[0]), "smol": str(smollm2_gguf())}
    with Processes() as procs:
        boot = procs.start("node", "--new-swarm", identity=tmp / "boot.key")
        servers: list[DaemonProcess] = []
        for name, (model, blocks) in SERVERS.items():
            args = [sources[model], "--blocks", blocks, "--initial-peers", boot.addr]
            # A fixed throughput and no dial-back check: neither is under test, both cost
            # start-up time on small machines.
            args += ["--throughput", "100", "--reachability", "public", "--cache-tokens", "4096"]
            servers.append(procs.spawn("serve", *args, identity=tmp / f"{name}.key"))
        with ThreadPoolExecutor(len(servers)) as pool:  # they load in parallel
            list(pool.map(lambda d: d.wait_ready(240), servers))
        yield boot


@pytest.fixture(scope="module")
def client(swarm) -> Iterator[SwarmClient]:
    config = ClientConfig(initial_peers=(swarm.addr,), step_timeout=30, request_timeout=60)
    with SwarmClient(config=config) as c:
        yield c


@pytest.fixture(scope="module")
def model(tiny, client) -> DistributedModelForCausalLM:
    return AutoDistributedModelForCausalLM.from_pretrained(tiny[0], client=client)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 9 tokens, the second left-padded by 3."""
    torch.manual_seed(11)
    ids = torch.randint(1, 128, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return ids, mask


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_family_class_and_research_path(model, tiny) -> None:
    """`transformer_blocks[1:3]` runs blocks 1 and 2 on tensors we pass."""
    assert isinstance(model, DistributedLlamaForCausalLM)
    _, ref = tiny
    torch.manual_seed(2)
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        hs = ref(ids, output_hidden_states=True).hidden_states  # hs[i]: the input of block i
    sub = model.transformer_blocks[1:3]
    assert (sub.blocks.start, sub.blocks.end) == (1, 3)
    assert err(sub(hs[1]), hs[3]) < TOL


def test_logits_loss_and_hidden_states_with_padding(model, tiny, batch) -> None:
    _, ref = tiny
    ids, mask = batch
    with torch.no_grad():
        got = model(ids, attention_mask=mask, labels=ids, output_hidden_states=True)
        want = ref(ids, attention_mask=mask, labels=ids, output_hidden_states=True)
    real = mask.bool()  # padded positions' outputs are not compared: no one reads them
    assert err(got.logits[real], want.logits[real]) < TOL
    assert abs(got.loss.item() - want.loss.item()) < TOL
    assert len(got.hidden_states) == len(want.hidden_states) == 5
    for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
        assert err(a[real], b[real]) < TOL


@pytest.mark.parametrize(
    "options",
    [
        dict(do_sample=False),
        dict(do_sample=False, num_beams=3),
        dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3),
    ],
    ids=["greedy", "beam", "sampling"],
)
def test_generate_matches_local(model, tiny, batch, options) -> None:
    _, ref = tiny
    ids, mask = batch
    kw = dict(attention_mask=mask, max_new_tokens=12, pad_token_id=0, **options)
    torch.manual_seed(7)
    got = model.generate(ids, **kw)
    torch.manual_seed(7)
    want = ref.generate(ids, **kw)
    assert got.tolist() == want.tolist()
    assert not model._sessions  # generate's own session was closed


def test_session_continues_across_generate_calls(model, tiny) -> None:
    _, ref = tiny
    torch.manual_seed(4)
    turn1 = torch.randint(1, 128, (1, 6))
    with model.inference_session(max_length=64) as session:
        out1 = model.generate(turn1, max_new_tokens=5, do_sample=False)
        assert session.position == out1.shape[1] - 1  # the last token is never fed
        turn2 = torch.cat([out1, torch.randint(1, 128, (1, 4))], 1)
        out2 = model.generate(turn2, max_new_tokens=5, do_sample=False)
        assert session.stats.steps == 2 + 4 + 4  # one prefill per turn: nothing recomputed
        # A conversation that diverges from what the session holds rolls it back.
        edited = turn2.clone()
        edited[0, 3] = (edited[0, 3] + 1) % 128
        out3 = model.generate(edited, max_new_tokens=5, do_sample=False)
    assert not model._sessions
    for prompt, out in [(turn2, out2), (edited, out3)]:
        assert out.tolist() == ref.generate(prompt, max_new_tokens=5, do_sample=False).tolist()


@pytest.fixture(scope="module")
def smollm2() -> tuple[Path, object, object]:
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    local = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    return gguf, tokenizer, local


def test_smollm2_answers_like_the_local_model(smollm2, swarm, capsys) -> None:
    """Joins the swarm itself (initial_peers), streams with TextStreamer, leaves on close()."""
    gguf, tokenizer, local = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    want = local.generate(ids, max_new_tokens=20, do_sample=False)
    expected = tokenizer.decode(want[0, ids.shape[1] :], skip_special_tokens=True)
    with AutoDistributedModelForCausalLM.from_pretrained(gguf, initial_peers=[swarm.addr]) as model:
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        got = model.generate(ids, max_new_tokens=20, do_sample=False, streamer=streamer)
    assert model._client is not None and model._client._closed
    text = tokenizer.decode(got[0, ids.shape[1] :], skip_special_tokens=True)
    assert text == expected
    assert text.strip() == "The capital of France is Paris."
    assert capsys.readouterr().out.strip() == text.strip()  # streamed as it was generated


def test_speculative_generate_through_the_swarm(model, tiny) -> None:
    """Prompt lookup and an assistant model through real servers: plain greedy tokens, in
    fewer steps than tokens (the servers' caches rolled back to each accepted prefix)."""
    _, ref = tiny
    torch.manual_seed(0)
    ids = torch.randint(1, 128, (1, 6)).repeat(1, 3)  # repetitive: prompt lookup drafts
    want = ref.generate(ids, max_new_tokens=16, do_sample=False)
    for kw in ({"prompt_lookup_num_tokens": 4}, {"assistant_model": ref}):
        with model.inference_session(max_length=64) as session:
            got = model.generate(ids, max_new_tokens=16, do_sample=False, **kw)
            assert got.tolist() == want.tolist(), kw
            assert session.stats.steps < 16, kw
