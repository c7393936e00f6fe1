"""The client RPC layer against a scripted fake server on an in-memory stream: every way a
reply can be wrong maps to the right error (BadReply for untrusted garbage, RemoteError with
is_bad_input for our mistakes, PeerUnavailable for silence or a broken stream)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import torch
import trio
import trio.testing

from petald.client.rpc import InferenceStream, call_forward, call_info, is_server_failure
from petald.errors import BadReply, PeerUnavailable, RemoteError
from petald.types import BlockRange
from petald.wire.messages import read_message, write_message
from petald.wire.streams import TrioByteStream

Script = Callable[[TrioByteStream], Awaitable[None]]


async def with_server(script: Script, body: Callable[[Callable], Awaitable[None]]) -> None:
    """Runs `body(opener)`; each stream the opener makes is answered by `script`. The body's
    error is raised as is (not in the nursery's exception group)."""
    error: list[BaseException] = []
    async with trio.open_nursery() as nursery:

        async def opener(peer: str, protocol: str) -> TrioByteStream:
            ours, theirs = trio.testing.memory_stream_pair()
            nursery.start_soon(script, TrioByteStream(theirs))
            return TrioByteStream(ours)

        try:
            await body(opener)
        except Exception as e:
            error.append(e)
        nursery.cancel_scope.cancel()
    if error:
        raise error[0]


def answering(header: dict, tensors_of=lambda hidden: []) -> Script:
    async def script(s: TrioByteStream) -> None:
        _, tensors = await read_message(s)
        await write_message(s, header, tensors_of(tensors[0] if tensors else None))

    return script


async def forward(script: Script, x: torch.Tensor) -> torch.Tensor:
    result = []

    async def body(opener) -> None:
        result.append(await call_forward(opener, "peer", BlockRange(0, 2), x, timeout=2))

    await with_server(script, body)
    return result[0]


async def test_good_answer_is_returned() -> None:
    x = torch.randn(1, 3, 8)
    out = await forward(answering({"ok": True}, lambda h: [h * 2]), x)
    assert torch.equal(out, x * 2)


@pytest.mark.parametrize(
    "tensors_of",
    [
        lambda h: [torch.randn(1, 3, 9)],  # wrong shape
        lambda h: [torch.zeros(1, 3, 8, dtype=torch.int64)],  # not floating point
        lambda h: [h, h],  # two tensors
        lambda h: [],
    ],
)
async def test_answers_that_do_not_fit_are_bad_replies(tensors_of) -> None:
    with pytest.raises(BadReply) as info:
        await forward(answering({"ok": True}, tensors_of), torch.randn(1, 3, 8))
    assert is_server_failure(info.value)


async def test_error_replies_say_whose_fault() -> None:
    with pytest.raises(RemoteError) as info:
        await forward(answering({"error": "busy", "retry_after": 7}), torch.randn(1, 1, 8))
    assert info.value.retry_after == 7 and is_server_failure(info.value)
    with pytest.raises(RemoteError) as info:
        await forward(answering({"error": "bad_shape", "message": "no"}), torch.randn(1, 1, 8))
    assert info.value.is_bad_input and not is_server_failure(info.value)


async def test_garbage_silence_and_hangups() -> None:
    async def garbage(s: TrioByteStream) -> None:
        await read_message(s)
        await s.write(b"\x05\xff\xff\xff\xff\xff")

    async def silent(s: TrioByteStream) -> None:
        await trio.sleep_forever()

    async def hangup(s: TrioByteStream) -> None:
        await read_message(s)
        await s.close()

    with pytest.raises(BadReply):
        await forward(garbage, torch.randn(1, 1, 8))
    with trio.fail_after(5), pytest.raises(PeerUnavailable, match="no answer within"):
        await forward(silent, torch.randn(1, 1, 8))
    # A hang-up before the whole answer is a BadReply too: either way the client fails over.
    with pytest.raises(BadReply, match="stream ended"):
        await forward(hangup, torch.randn(1, 1, 8))


async def test_info_needs_a_model() -> None:
    async def body(opener) -> None:
        with pytest.raises(BadReply):
            await call_info(opener, "peer", timeout=2)

    await with_server(answering({"hello": 1}), body)


async def test_inference_step_checks_step_and_position() -> None:
    async def server(s: TrioByteStream) -> None:
        await read_message(s)
        await write_message(s, {"ok": True})
        header, (hidden,) = await read_message(s)
        await write_message(s, {"ok": True, "step": header["step"], "position": 2}, [hidden])
        header, (hidden,) = await read_message(s)  # answers with a stale position
        await write_message(s, {"ok": True, "step": header["step"], "position": 2}, [hidden])

    async def body(opener) -> None:
        session = await InferenceStream.open(
            opener, "peer", BlockRange(0, 2), max_length=8, batch=1, timeout=2
        )
        x = torch.randn(1, 2, 8)
        assert torch.equal(await session.step(1, 0, x), x)
        with pytest.raises(BadReply, match="step/position"):
            await session.step(2, 2, x[:, :1])
        assert session.closed  # a bad reply ends that server's part of the session

    await with_server(server, body)
