"""Fine-tuning through the swarm against the same computation on the local transformers model.
One module-scoped swarm: a tiny random Llama of 4 blocks on `petald serve` processes A = 0:2,
B = 2:4 and its replica C = 2:4 (announcing a far lower throughput, so routes take B until the
last test kills it mid-step), all with two server adapters: "french" (q_proj) and "mine" (saved
by petald's own `RemoteLoRA.save_peft`, q_proj + v_proj).

Tolerances (fp32): gradients within GRAD_TOL = 1e-4 relative (max abs error / max abs value) of
autograd on the local model with the same prompts / LoRA hooks; losses within LOSS_TOL = 1e-4
relative step by step over a short training run; logits within 1e-4 absolute; greedy tokens
identical. Also: a client's LoRA never reaches another client's concurrent requests (the other
gets bit-identical plain outputs), and bad adapters fail with the server's message."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from petald import AutoDistributedModelForCausalLM, AutoDistributedModelForSequenceClassification
from petald.client import ClientConfig, SwarmClient, Tuning, remote_forward
from petald.errors import RemoteError, RoutingError
from petald.models import RemoteLoRA
from petald.testing import DaemonProcess, Processes
from petald.testing.models import save_tiny_llama

pytestmark = pytest.mark.slow

GRAD_TOL = 1e-4
LOSS_TOL = 1e-4
TINY = "tiny-llama-ft"
TARGETS = ["self_attn.q_proj", "self_attn.v_proj"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM]:
    path = tmp_path_factory.mktemp("models") / TINY
    model = save_tiny_llama(path, layers=4, seed=7)
    model.requires_grad_(False)
    return path, model


def random_lora(config, targets, seed: int, rank: int = 4) -> RemoteLoRA:
    """A LoRA with nonzero B (a fresh one is zero: no effect, no gradient for A)."""
    torch.manual_seed(seed)
    lora = RemoteLoRA(config, targets, rank=rank, alpha=2.0 * rank)
    with torch.no_grad():
        for b in lora.B.values():
            b.normal_(std=0.05)
    return lora


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory) -> dict[str, RemoteLoRA]:
    root = tmp_path_factory.mktemp("adapters")
    made = {
        "french": random_lora(tiny[1].config, ["self_attn.q_proj"], seed=1),
        "mine": random_lora(tiny[1].config, TARGETS, seed=2),
    }
    for name, lora in made.items():
        lora.save_peft(root / name)
    return {"root": root, **made}  # type: ignore[dict-item]


@pytest.fixture(scope="module")
def swarm(tiny, adapters, tmp_path_factory) -> Iterator[DaemonProcess]:
    tmp = tmp_path_factory.mktemp("ft-swarm")
    root = adapters["root"]
    with Processes() as procs:
        boot = procs.start("node", "--new-swarm", identity=tmp / "boot.key")
        servers: dict[str, DaemonProcess] = {}
        for name, blocks, throughput in [("A", "0:2", 100), ("B", "2:4", 10**6), ("C", "2:4", 1)]:
            args = [str(tiny[0]), "--blocks", blocks, "--initial-peers", boot.addr]
            args += ["--adapters", str(root / "french"), str(root / "mine")]
            # Throughput is announced, not measured (start-up time), and steers routes to B.
            args += ["--throughput", str(throughput), "--reachability", "public"]
            args += ["--cache-tokens", "2048"]
            servers[name] = procs.spawn("serve", *args, identity=tmp / f"{name}.key")
        with ThreadPoolExecutor(len(servers)) as pool:
            list(pool.map(lambda d: d.wait_ready(120), servers.values()))
        boot.servers = servers  # type: ignore[attr-defined]
        yield boot


def new_client(swarm: DaemonProcess) -> SwarmClient:
    return SwarmClient(config=ClientConfig(initial_peers=(swarm.addr,), request_timeout=60))


@pytest.fixture(scope="module")
def client(swarm) -> Iterator[SwarmClient]:
    with new_client(swarm) as c:
        yield c


def load(tiny, client, **kwargs):
    return AutoDistributedModelForCausalLM.from_pretrained(tiny[0], client=client, **kwargs)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three sequences of 7 tokens, the second left-padded by 2 (labels -100 there)."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 128, (3, 7), generator=gen)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :2] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def local_loss(ref, ids, mask, labels, *, prompts=None, deep=None, lora=None, embeds=None):
    """The distributed model's computation on the local model: prompts prepended (mask 1,
    positions first), deep prompts added to each block's input there, LoRA deltas on its
    targets via hooks; the prompt positions' outputs dropped before the head."""
    x = (embeds if embeds is not None else ref.model.embed_tokens)(ids)
    p = 0 if prompts is None else prompts.shape[0]
    if p:
        x = torch.cat([prompts.expand(ids.shape[0], p, -1), x], 1)
        mask = torch.cat([torch.ones(ids.shape[0], p, dtype=mask.dtype), mask], 1)
    handles = []
    for i, layer in enumerate(ref.model.layers):
        if deep is not None:

            def add(mod, args, kwargs, i=i):
                h = args[0] if args else kwargs["hidden_states"]
                h = h + F.pad(deep[i].unsqueeze(0), (0, 0, 0, h.shape[1] - p))
                if args:
                    return (h, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": h}

            handles.append(layer.register_forward_pre_hook(add, with_kwargs=True))
        for target, (a, b) in (lora.weights() if lora is not None else {}).items():

            def delta(mod, args, out, a=a[i], b=b[i], s=lora.scale):
                return out + s * (args[0] @ a.T) @ b.T

            handles.append(layer.get_submodule(target).register_forward_hook(delta))
    try:
        out = ref.model(inputs_embeds=x, attention_mask=mask).last_hidden_state[:, p:]
    finally:
        for h in handles:
            h.remove()
    logits = ref.lm_head(out)
    return ref.loss_function(logits, labels, ref.config.vocab_size), logits


def test_ptune_prompts_and_embeddings_gradients(tiny, client, batch) -> None:
    _, ref = tiny
    ids, mask, labels = batch
    model = load(tiny, client, tuning_mode="ptune", pre_seq_len=3)
    model.get_input_embeddings().requires_grad_(True)
    out = model(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    prompts = model.remote_tuning.prompts.detach().clone().requires_grad_(True)
    embeds = torch.nn.Embedding.from_pretrained(ref.model.embed_tokens.weight.clone(), freeze=False)
    loss, logits = local_loss(ref, ids, mask, labels, prompts=prompts, embeds=embeds)
    loss.backward()
    errors = {
        "loss": rel(out.loss.detach(), loss.detach()),
        "prompts": rel(model.remote_tuning.prompts.grad, prompts.grad),
        "embeddings": rel(model.get_input_embeddings().weight.grad, embeds.weight.grad),
    }
    print(f"ptune: relative errors vs local autograd {errors}")
    assert out.logits.shape == logits.shape == (3, 7, 128)
    assert all(e < GRAD_TOL for e in errors.values()), errors


def served_batches(client: SwarmClient, swarm: DaemonProcess) -> Counter[tuple[str, int]]:
    """(op, batch size) -> forward/backward requests the swarm's servers answered so far (their
    `info`'s `served`), summed over the servers."""
    from petald.client.rpc import call_info

    async def read() -> Counter[tuple[str, int]]:
        total: Counter[tuple[str, int]] = Counter()
        for server in swarm.servers.values():  # type: ignore[attr-defined]
            info = await call_info(client.open_stream, server.peer_id, timeout=30)
            for op, by_batch in info["served"].items():
                total.update({(op, int(b)): n for b, n in by_batch.items()})
        return total

    return client.run(read)


def test_deep_prompts_and_client_lora_gradients_in_sub_batches(tiny, client, swarm, batch) -> None:
    """Deep prompts and LoRA A/B get the local gradients; batches split into sub-batches
    (at most 2 sequences each here) give the same as one request. The split is observed on the
    servers (requests answered per batch size): 3 rows in every request without the limit, 2
    and 1 with it, forward and backward alike.
    Catches: a client that ignores the limit (whole batch in one request: the gradients alone
    were equal either way), one that splits without being asked."""
    _, ref = tiny
    ids, mask, labels = batch
    model = load(tiny, client, tuning_mode="deep_ptune", pre_seq_len=2)
    with torch.no_grad():
        model.remote_tuning.deep_prompts.normal_(std=0.05)
    model.remote_tuning.lora = random_lora(ref.config, TARGETS, seed=4)
    grads = {}
    for limits, sizes in [(None, {3}), ((2, 8192), {2, 1})]:
        model.zero_grad()
        before = served_batches(client, swarm)
        if limits is not None:
            client.request_limits = lambda peers, limits=limits: limits  # type: ignore[method-assign]
        try:
            model(ids, attention_mask=mask, labels=labels).loss.backward()
        finally:
            client.__dict__.pop("request_limits", None)
        seen = served_batches(client, swarm) - before
        for op in ("forward", "backward"):
            assert {b for o, b in seen if o == op} == sizes, (limits, seen)
        grads[limits] = {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }
    tuning = model.remote_tuning
    prompts = tuning.prompts.detach().clone().requires_grad_(True)
    deep = tuning.deep_prompts.detach().clone().requires_grad_(True)
    lora = random_lora(ref.config, TARGETS, seed=4)
    loss, _ = local_loss(ref, ids, mask, labels, prompts=prompts, deep=deep, lora=lora)
    loss.backward()
    want = {"tuning.prompts": prompts.grad, "tuning.deep_prompts": deep.grad}
    for t in TARGETS:
        key = t.replace(".", "__")
        want[f"tuning.lora.A.{key}"] = lora.A[key].grad
        want[f"tuning.lora.B.{key}"] = lora.B[key].grad
    for limits, got in grads.items():
        errors = {n: rel(got[n], g) for n, g in want.items()}
        print(f"deep_ptune + LoRA, limits {limits}: relative gradient errors {errors}")
        assert set(got) == set(want) and max(errors.values()) < GRAD_TOL


def test_training_lowers_the_loss_like_local_training(tiny, client, batch) -> None:
    """The task: say token 5 everywhere (learnable by a prompt, unlike the random labels)."""
    _, ref = tiny
    ids, mask, _ = batch
    labels = torch.full_like(ids, 5).masked_fill(mask == 0, -100)
    torch.manual_seed(0)  # the prompts' initial tokens
    model = load(tiny, client, tuning_mode="ptune", pre_seq_len=4)
    local_prompts = model.remote_tuning.prompts.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=0.1)
    local_opt = torch.optim.Adam([local_prompts], lr=0.1)
    curve, local_curve = [], []
    for _ in range(8):
        opt.zero_grad()
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        local_opt.zero_grad()
        local, _ = local_loss(ref, ids, mask, labels, prompts=local_prompts)
        local.backward()
        local_opt.step()
        curve.append(loss.item())
        local_curve.append(local.item())
    print("loss through the swarm:", " ".join(f"{x:.4f}" for x in curve))
    print("loss locally:          ", " ".join(f"{x:.4f}" for x in local_curve))
    assert curve[-1] < curve[0] - 0.3  # a random tiny model learns slowly; 8 steps
    for a, b in zip(curve, local_curve, strict=True):
        assert abs(a - b) / abs(b) < LOSS_TOL
    # The trained prompts change what the model says (the plain model ignores them).
    plain = load(tiny, client)
    with torch.no_grad():
        tuned_logits = model(ids[:1]).logits
        plain_logits = plain(ids[:1]).logits
    assert (tuned_logits - plain_logits).abs().max() > 1e-2


def test_generation_with_deep_prompts_and_lora_matches_local(tiny, client) -> None:
    _, ref = tiny
    torch.manual_seed(1)
    model = load(tiny, client, tuning_mode="deep_ptune", pre_seq_len=3)
    with torch.no_grad():
        model.remote_tuning.deep_prompts.normal_(std=0.3)
    model.remote_tuning.lora = random_lora(ref.config, TARGETS, seed=5)
    ids = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(8))
    got = model.generate(ids, max_new_tokens=6, do_sample=False)
    tuning, lora = model.remote_tuning, random_lora(ref.config, TARGETS, seed=5)
    want = ids
    with torch.no_grad():
        for _ in range(6):  # greedy, recomputing everything each step: no cache to get wrong
            labels = torch.full_like(want, -100)
            _, logits = local_loss(
                ref, want, torch.ones_like(want), labels,
                prompts=tuning.prompts, deep=tuning.deep_prompts, lora=lora,
            )  # fmt: skip
            want = torch.cat([want, logits[:, -1:].argmax(-1)], 1)
            if want[0, -1] == ref.config.eos_token_id:  # where generate() stops too
                break
    plain = load(tiny, client).generate(ids, max_new_tokens=6, do_sample=False)
    print(f"tuned: {got[0, 5:].tolist()}  local: {want[0, 5:].tolist()}  plain: {plain[0, 5:]}")
    assert torch.equal(got, want)
    assert not torch.equal(got, plain)


def test_server_adapters_by_name_and_the_saved_format(tiny, client, adapters, batch) -> None:
    """active_adapter="mine" (saved by RemoteLoRA.save_peft, served by petald serve) equals the
    same LoRA applied by the client, loaded back from that directory."""
    ids, mask, _ = batch
    served = load(tiny, client, active_adapter="mine")
    mine = load(tiny, client)
    lora = mine.load_remote_lora(adapters["root"] / "mine")
    assert torch.equal(lora.A["self_attn__v_proj"], adapters["mine"].A["self_attn__v_proj"])
    with torch.no_grad():
        a = served(ids, attention_mask=mask).logits
        b = mine(ids, attention_mask=mask).logits
        plain = load(tiny, client)(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (a - b)[real].abs().max() < 1e-4
    assert (a - plain)[real].abs().max() > 1e-3
    out = served.generate(ids[:1], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 10)


def test_a_clients_lora_never_reaches_another_clients_requests(tiny, client, swarm) -> None:
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(4))
    plain = load(tiny, client)
    with torch.no_grad():
        expected = plain(ids).logits
    with new_client(swarm) as other_client:
        tuned = load(tiny, other_client)
        tuned.add_remote_lora(TARGETS, rank=4)
        with torch.no_grad():
            for b in tuned.remote_tuning.lora.B.values():
                b.normal_(std=0.5)
        barrier, outs, errors = threading.Barrier(2), {"plain": [], "tuned": []}, []

        def run(name, model) -> None:
            try:
                barrier.wait(timeout=30)
                for _ in range(8):
                    with torch.no_grad():
                        outs[name].append(model(ids).logits)
            except Exception as e:
                errors.append(e)

        threads = [
            threading.Thread(target=run, args=a) for a in [("plain", plain), ("tuned", tuned)]
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors and all(not t.is_alive() for t in threads)
    assert all(torch.equal(o, expected) for o in outs["plain"])
    assert all((o - expected).abs().max() > 1e-2 for o in outs["tuned"])


def test_bad_adapters_fail_with_the_servers_message(tiny, client) -> None:
    from petald.client import RemoteSequential

    seq = RemoteSequential(client, TINY, 4)
    x = torch.randn(1, 4, 64)
    a, b = torch.randn(4, 4, 64), torch.randn(4, 64, 4)
    cases = [
        ({"self_attn.q_proj": (a, b[:, :, :2])}, "bad_input", "LoRA self_attn.q_proj"),
        ({"self_attn.q_proj": (a.long(), b)}, "bad_named", "floating-point"),
        ({f"mlp.t{i}": (a, b) for i in range(9)}, "bad_named", "at most 17"),
        ({"mlp.nothing": (a, b)}, "bad_input", "not a layer"),
    ]
    for lora, code, text in cases:
        with pytest.raises(RemoteError) as info:
            remote_forward(seq, x, tuning=Tuning.build(0, lora=lora))
        assert info.value.code == code and text in str(info.value), (code, str(info.value))
    with pytest.raises(RoutingError, match=r"'german'.*'french', 'mine'"):
        load(tiny, client, active_adapter="german")(torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="not linear layers"):
        load(tiny, client).add_remote_lora(["self_attn.rotary"])


def test_sequence_classification_trains_only_the_head(tiny, client, batch) -> None:
    path, ref = tiny
    ids, mask, _ = batch
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        path, client=client, num_labels=3
    )
    model.config.pad_token_id = 0
    ids = ids.masked_fill(mask == 0, 0)
    local = LlamaForSequenceClassification(model.config).eval()
    local.model.load_state_dict(ref.model.state_dict())
    local.score.weight.data.copy_(model.score.weight.data)
    local.requires_grad_(False)
    local.score.requires_grad_(True)
    labels = torch.tensor([0, 2, 1])
    out = model(ids, attention_mask=mask, labels=labels)
    want = local(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    want.loss.backward()
    assert [n for n, _ in model.named_parameters() if _.requires_grad] == ["score.weight"]
    assert (out.logits - want.logits).abs().max() < 1e-4
    assert rel(model.score.weight.grad, local.score.weight.grad) < GRAD_TOL


def test_backward_fails_over_to_a_replica(tiny, client, swarm, batch) -> None:
    """Server B (2:4) dies between the forward and the backward: the backward of its hop goes
    to C with the kept hop input, and the gradients are still the local ones. Last: it kills B."""
    _, ref = tiny
    ids, mask, labels = batch
    model = load(tiny, client, tuning_mode="ptune", pre_seq_len=2)
    loss = model(ids, attention_mask=mask, labels=labels).loss
    fast = swarm.servers["B"]
    fast.kill()
    loss.backward()

    async def banned() -> set[str]:
        return client.banned()

    assert fast.peer_id in client.run(banned)
    prompts = model.remote_tuning.prompts.detach().clone().requires_grad_(True)
    local_loss(ref, ids, mask, labels, prompts=prompts)[0].backward()
    error = rel(model.remote_tuning.prompts.grad, prompts.grad)
    print(f"backward after SIGKILL of B: prompt gradient relative error {error:.1e}")
    assert error < GRAD_TOL
