"""`petald serve` as a real process: it loads a span of a tiny Llama saved with save_pretrained,
answers `info` and `forward` for any sub-range of it within 1e-5 of the local transformers
layers, refuses bad requests with error replies while it keeps serving, and announces itself so
`petald status` lists it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import trio
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from petald.server.handlers import FORWARD_PROTOCOL, INFO_PROTOCOL
from petald.testing import DaemonProcess, Processes, petald_json
from petald.testing.models import save_tiny_llama
from petald.testing.rpc import RawSession, rpc_call, rpc_client
from petald.wire.messages import read_message, write_message

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM]:
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    model = save_tiny_llama(path, layers=4, intermediate=128, vocab=128)
    return path, model


RANK = 4


def peft_adapter(directory: Path, seed: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """A LoRA adapter on q_proj of every block, saved as peft saves it; returns {block: (A, B)}."""
    gen = torch.Generator().manual_seed(seed)
    weights, tensors = {}, {}
    for block in range(4):
        a, b = (
            torch.randn(RANK, 64, generator=gen) * 0.1,
            torch.randn(64, RANK, generator=gen) * 0.1,
        )
        prefix = f"base_model.model.model.layers.{block}.self_attn.q_proj"
        tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a, b
        weights[block] = (a, b)
    directory.mkdir(parents=True)
    save_file(tensors, directory / "adapter_model.safetensors")
    (directory / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": 2 * RANK}))
    return weights


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> tuple[Path, dict]:
    directory = tmp_path_factory.mktemp("adapters") / "french"
    return directory, peft_adapter(directory, seed=5)


@pytest.fixture(scope="module")
def served(tiny_llama, adapter, tmp_path_factory) -> Iterator[list[DaemonProcess]]:
    path, _ = tiny_llama
    tmp = tmp_path_factory.mktemp("serve")
    with Processes() as procs:
        boot = procs.start("node", "--new-swarm", identity=tmp / "boot.key")
        server = procs.start(
            "serve",
            str(path),
            "--blocks",
            "1:4",
            "--initial-peers",
            boot.addr,
            "--cache-tokens",
            "64",
            "--adapters",
            str(adapter[0]),
            identity=tmp / "server.key",
            ready_timeout=120,
        )
        yield [boot, server]


async def call(server: DaemonProcess, protocol, header: dict, tensors=()):
    return await rpc_call(server, protocol, header, tensors)


async def test_forward_matches_local_layers_on_any_sub_range(served, tiny_llama) -> None:
    _, model = tiny_llama
    server = served[1]
    info, _ = await call(server, INFO_PROTOCOL, {})
    assert info["model"] == "tiny-llama" and info["blocks"] == [1, 4] and info["hidden_size"] == 64
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states  # hs[i]: input of layer i
    for start, end in [(1, 3), (2, 3)]:
        header, tensors = await call(
            server, FORWARD_PROTOCOL, {"start": start, "end": end}, [hs[start]]
        )
        assert header == {"ok": True, "tensors": 1}
        err = (tensors[0] - hs[end]).abs().max().item()
        print(f"blocks {start}:{end}: max |remote - local| = {err:.2e}")
        assert err < 1e-5


async def test_bad_requests_get_error_replies_and_the_server_keeps_serving(
    served, tiny_llama
) -> None:
    server = served[1]
    good = torch.randn(1, 3, 64)
    cases = [
        ({"start": 0, "end": 2}, [good], "bad_blocks"),
        ({"start": 1, "end": 9}, [good], "bad_blocks"),
        ({"start": "1"}, [good], "bad_blocks"),
        ({}, [torch.randn(1, 3, 65)], "bad_shape"),
        ({}, [torch.randn(3, 64)], "bad_shape"),
        ({}, [torch.zeros(1, 3, 64, dtype=torch.int64)], "bad_dtype"),
        ({}, [torch.randn(1, 9000, 64)], "too_large"),
        ({}, [good, torch.ones(2, 2)], "bad_mask"),
        ({"codec": "gzip"}, [good], "bad_codec"),
        ({}, [], "bad_tensors"),
    ]
    for header, tensors, code in cases:
        answer, _ = await call(server, FORWARD_PROTOCOL, header, tensors)
        assert answer.get("error") == code, (header, answer)
    answer, out = await call(server, FORWARD_PROTOCOL, {"codec": "fp16"}, [good])
    assert answer["ok"] and out[0].shape == good.shape


def test_status_lists_the_server(served) -> None:
    boot, server = served
    st = petald_json(
        "status", "--json", "--model", "tiny-llama", "--initial-peers", boot.addr,
        "--expect-servers", server.peer_id, "--wait", "60",
    )  # fmt: skip
    model = next(m for m in st["models"] if m["model"] == "tiny-llama")
    assert [(s["peer_id"], s["blocks"], s["state"]) for s in model["servers"]] == [
        (server.peer_id, "1:4", "online")
    ]
    assert model["n_blocks"] == 4
    assert [(c["blocks"], c["servers"]) for c in model["coverage"]] == [("0:1", 0), ("1:4", 1)]


async def test_backward_matches_local_autograd(served, tiny_llama) -> None:
    """Remote input gradients equal autograd through the same span loaded locally (the span's
    own backward is checked against transformers in tests/unit/server)."""
    from petald.server.handlers import BACKWARD_PROTOCOL
    from petald.server.loading import load_span

    path, _ = tiny_llama
    server = served[1]
    local = load_span(path, (1, 4), progress=False)
    x, g = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    xr = x.clone().requires_grad_(True)
    local.forward(xr, start_block=1, end_block=3, attention_mask=mask).backward(g)
    header, tensors = await call(server, BACKWARD_PROTOCOL, {"start": 1, "end": 3}, [x, g, mask])
    assert header == {"ok": True, "tensors": 1}
    err = (tensors[0] - xr.grad).abs().max().item()
    print(f"backward blocks 1:3: max |remote - local| grad = {err:.2e}")
    assert err < 1e-5
    bad, _ = await call(server, BACKWARD_PROTOCOL, {}, [x, torch.randn(2, 4, 64)])
    assert bad["error"] == "bad_grad"


async def with_sessions(server: DaemonProcess, body) -> None:
    from petald.server.inference import INFERENCE_PROTOCOL

    async with rpc_client(server) as open_stream:

        async def open_session() -> RawSession:
            return RawSession(await open_stream(INFERENCE_PROTOCOL))

        await body(open_session)


async def test_inference_session_steps_rollback_retransmit_and_budget(served, tiny_llama) -> None:
    """Catches (among others): garbage opening a session answered by a silent close instead of
    a `malformed` error reply (the old check read with every outcome suppressed)."""
    _, model = tiny_llama
    server = served[1]
    ids = torch.randint(0, 128, (1, 8))
    alt = ids.clone()
    alt[0, 5:] = (ids[0, 5:] + 1) % 128
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
        hs_alt = model(alt, output_hidden_states=True).hidden_states

    async def body(open_session) -> None:
        s = await open_session()
        opened, _ = await s.send({"batch": 1, "max_length": 40, "start": 1, "end": 3})
        assert opened["ok"]
        # The budget is 64 tokens: a second 40-token session is refused at once with "busy".
        other = await open_session()
        busy, _ = await other.send({"batch": 1, "max_length": 40, "start": 1, "end": 3})
        assert busy["error"] == "busy" and busy["retry_after"] > 0
        outs = []
        h, (prefix,) = await s.send({"step": 0, "position": 0}, [hs[1][:, :4]])
        assert h["position"] == 4
        outs.append(prefix)
        for t in range(4, 8):
            h, (o,) = await s.send({"step": t, "position": t}, [hs[1][:, t : t + 1]])
            outs.append(o)
        err = (torch.cat(outs, dim=1) - hs[3]).abs().max().item()
        print(f"inference session, 8 tokens step by step: max |remote - full forward| = {err:.2e}")
        assert err < 1e-5
        # Retransmission of the last step: same answer, nothing applied twice.
        again, (o2,) = await s.send({"step": 7, "position": 7}, [hs[1][:, 7:8]])
        assert again["position"] == 8 and torch.equal(o2, outs[-1])
        # Roll back to position 5 and continue with other tokens.
        h, (o,) = await s.send({"step": 8, "position": 5}, [hs_alt[1][:, 5:8]])
        assert h["position"] == 8
        assert (o - hs_alt[3][:, 5:8]).abs().max().item() < 1e-5
        # Bad steps are answered and leave the session usable; garbage on another stream and a
        # step on a stream that never opened a session are refused meanwhile.
        bad_steps = [
            ({"step": 9, "position": 8}, [torch.randn(1, 1, 65)], "bad_shape"),
            ({"step": 9, "position": 8}, [torch.randn(2, 1, 64)], "bad_shape"),
            ({"step": 9, "position": 8}, [torch.ones(1, 1, 64, dtype=torch.int32)], "bad_dtype"),
            ({"step": 9, "position": 9}, [torch.randn(1, 1, 64)], "bad_position"),
            ({"step": 9, "position": 8}, [torch.randn(1, 40, 64)], "too_long"),
            ({"step": 9, "position": 8}, [torch.randn(1, 1, 64), torch.ones(1, 3)], "bad_mask"),
            ({"step": 9, "position": 8, "positions": True}, [torch.randn(1, 1, 64)], "bad_tensors"),
        ]
        for header, tensors, code in bad_steps:
            bad, _ = await s.send(header, tensors)
            assert bad["error"] == code, (header, bad)
        stray = await open_session()
        await stray.stream.write(b"\x05garbage-that-is-no-message")
        with trio.fail_after(30):  # an error reply, never a hang or a silent close
            answer, _ = await read_message(stray.stream)
        assert answer["error"] == "malformed", answer
        unopened = await open_session()
        refused, _ = await unopened.send({"step": 0, "position": 0}, [hs[1][:, :1]])
        assert refused["error"] == "malformed"
        h, _ = await s.send({"step": 10, "position": 8}, [torch.randn(1, 1, 64)])
        assert h["position"] == 9
        await write_message(s.stream, {"close": True})
        # Closing returned the tokens: the other client can open now.
        third = await open_session()
        ok, _ = await third.send({"batch": 1, "max_length": 40, "start": 1, "end": 3})
        assert ok.get("ok"), ok

    await with_sessions(server, body)


async def test_all_hidden_and_beam_reorder_over_the_wire(served, tiny_llama) -> None:
    from petald.server.inference import INFERENCE_PROTOCOL

    _, model = tiny_llama
    server = served[1]
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    header, (stacked,) = await call(server, FORWARD_PROTOCOL, {"all_hidden": True}, [hs[1]])
    assert header["ok"] and stacked.shape == (3, 2, 6, 64)
    for i in range(2):  # hs[4] is after the final norm in transformers: compare the plain output
        assert (stacked[i] - hs[2 + i]).abs().max().item() < 1e-5
    _, (last,) = await call(server, FORWARD_PROTOCOL, {}, [hs[1]])
    assert torch.equal(stacked[2], last)
    bad, _ = await call(server, FORWARD_PROTOCOL, {"all_hidden": "yes"}, [hs[1]])
    assert bad["error"] == "bad_request"

    async with rpc_client(server) as open_stream:
        s = RawSession(await open_stream(INFERENCE_PROTOCOL))
        assert (await s.send({"batch": 2, "max_length": 8, "start": 1, "end": 3}))[0]["ok"]
        await s.send({"step": 0, "position": 0}, [hs[1][:, :5]])
        # Beam search kept sequence 1 twice: the next step continues sequence 1 in both rows.
        h, (out,) = await s.send({"step": 1, "position": 5, "reorder": [1, 1]}, [hs[1][[1, 1], 5:]])
        assert h["ok"] and (out - hs[3][[1, 1], 5:]).abs().max().item() < 1e-5
        bad, _ = await s.send({"step": 2, "position": 6, "reorder": [0, 2]}, [hs[1][:, :1]])
        assert bad["error"] == "bad_reorder"


def merged_llama(model: LlamaForCausalLM, deltas: dict[int, torch.Tensor]) -> LlamaForCausalLM:
    """A copy of `model` with q_proj.weight += delta in the given blocks."""
    import copy

    merged = copy.deepcopy(model)
    with torch.no_grad():
        for block, delta in deltas.items():
            merged.model.layers[block].self_attn.q_proj.weight += delta
    return merged


async def test_client_lora_and_server_adapters_over_the_wire(served, tiny_llama, adapter) -> None:
    """A client's LoRA tensors travel with its request, give the merged model's hidden states
    and their gradients, and leave no trace for the next request; a server adapter is picked by
    name; bad adapters are refused.
    Catches: a server adapter missing from some served blocks (block 3's zeroed: only the whole
    span's output, compared with block 3 of the merged model, shows it)."""
    from petald.server.handlers import BACKWARD_PROTOCOL

    _, model = tiny_llama
    server = served[1]
    info, _ = await call(server, INFO_PROTOCOL, {})
    assert info["adapters"] == ["french"]
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    gen = torch.Generator().manual_seed(9)
    a = torch.randn(2, RANK, 64, generator=gen) * 0.1  # blocks 1:3
    b = torch.randn(2, 64, RANK, generator=gen) * 0.1
    lora = {"named": ["lora.self_attn.q_proj.A", "lora.self_attn.q_proj.B"], "lora_scale": 0.5}
    header, (out,) = await call(server, FORWARD_PROTOCOL, {"end": 3, **lora}, [hs[1], a, b])
    merged = merged_llama(model, {1: 0.5 * b[0] @ a[0], 2: 0.5 * b[1] @ a[1]})
    with torch.no_grad():
        ref = merged(ids, output_hidden_states=True).hidden_states
    assert header["ok"] and (out - ref[3]).abs().max().item() < 1e-5
    # The next request without LoRA is the plain model again.
    _, (plain,) = await call(server, FORWARD_PROTOCOL, {"end": 3}, [hs[1]])
    assert (plain - hs[3]).abs().max().item() < 1e-5

    # Backward: input gradient and the gradients of A and B, as autograd on the client says.
    g = torch.randn(2, 5, 64)
    a_ref, b_ref = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    x = hs[1].clone().requires_grad_(True)
    from petald.server.adapters import LoRA
    from petald.server.loading import load_span

    local = load_span(tiny_llama[0], (1, 3), progress=False)
    local.forward(x, lora=LoRA({"self_attn.q_proj": (a_ref, b_ref)}, 0.5)).backward(g)
    header, grads = await call(server, BACKWARD_PROTOCOL, {"end": 3, **lora}, [hs[1], g, a, b])
    assert header["named"] == lora["named"] and len(grads) == 3
    for mine, ref_grad in zip(grads, [x.grad, a_ref.grad, b_ref.grad], strict=True):
        assert (mine - ref_grad).abs().max().item() < 1e-5

    # The server's own adapter, by name: the merged model with its weights (scale alpha/r = 2),
    # on blocks 1:3 and on the whole span 1:4. transformers' last hidden state is normed, so
    # block 3's own output is taken from the layer.
    weights = adapter[1]
    header, (out,) = await call(server, FORWARD_PROTOCOL, {"active_adapter": "french"}, [hs[1]])
    merged = merged_llama(model, {i: 2.0 * weights[i][1] @ weights[i][0] for i in (1, 2, 3)})
    block3: list[torch.Tensor] = []
    hook = merged.model.layers[3].register_forward_hook(
        lambda _m, _a, o: block3.append(o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        ref = merged(ids, output_hidden_states=True).hidden_states
    hook.remove()
    _, (ref_last,) = await call(
        server, FORWARD_PROTOCOL, {"end": 3, "active_adapter": "french"}, [hs[1]]
    )
    assert header["ok"] and (out - block3[0]).abs().max().item() < 1e-5
    assert (ref_last - ref[3]).abs().max().item() < 1e-5
    assert (ref[3] - hs[3]).abs().max().item() > 1e-3  # the adapter changes the output

    bad = [
        ({"active_adapter": "german"}, [hs[1]], "bad_input"),
        ({**lora}, [hs[1], a[:, :2], b], "bad_input"),  # rank 2 A with rank 4 B
        ({"named": ["lora.self_attn.q_proj.A"]}, [hs[1], a], "bad_input"),  # no B
        ({"named": ["lora.x;y.A"]}, [hs[1], a], "bad_named"),
        ({"named": ["prompts"]}, [hs[1], torch.zeros(3, 1, 2, 64)], "bad_input"),  # 3 blocks?
        ({**lora, "active_adapter": "french"}, [hs[1], a, b], "bad_input"),
    ]
    for extra, tensors, code in bad:
        answer, _ = await call(server, FORWARD_PROTOCOL, {"end": 3, **extra}, tensors)
        assert answer.get("error") == code, (extra, answer)
