"""Async client side of the block RPCs (petald.wire.messages on libp2p streams): `call_info`,
`call_forward`, `call_backward` (one request per stream, as the server closes it after the
answer) and `InferenceStream`, one long-lived stream per inference session and server.

Every call runs under `trio.fail_after` and turns every way it can fail into one of three
errors: `PeerUnavailable` (cannot reach, stream broke, timeout), `RemoteError` (the server
answered an error; `is_bad_input` says whether it was our request's fault) and `BadReply` (an
answer that does not parse or does not fit: wrong shape, dtype, step). Replies are untrusted:
tensors are checked against what was asked before anyone uses them. Opening streams is the
caller's business (`StreamOpener`, given by the `SwarmClient`), so this module needs no host."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import torch
import trio
from libp2p.custom_types import TProtocol

from petald.client.tuning import Tuning
from petald.errors import (
    BadReply,
    PeerUnavailable,
    PetaldError,
    RemoteError,
    SessionClosed,
    WireError,
)
from petald.types import BlockRange
from petald.wire import trace
from petald.wire.messages import read_message, write_message
from petald.wire.protocols import (
    BACKWARD_PROTOCOL,
    FORWARD_PROTOCOL,
    INFERENCE_PROTOCOL,
    INFO_PROTOCOL,
)

# The same strings as petald.server.handlers/inference (client/ must not import server/).

# Bytes of a server's session token (petald.server.push.TOKEN_BYTES).
SESSION_TOKEN_BYTES = 16
# Answers to earlier steps a stream may hold before the one awaited (see `receive_step`).
MAX_STALE_ANSWERS = 2

# (peer_id, protocol) -> a new stream to that peer; raises PeerUnavailable.
StreamOpener = Callable[[str, TProtocol], Awaitable[Any]]


def is_server_failure(error: BaseException) -> bool:
    """Whether another server should be tried: every failure but our own bad input."""
    if isinstance(error, RemoteError):
        return not error.is_bad_input
    return isinstance(error, PeerUnavailable | BadReply | SessionClosed)


def _check_reply(peer: str, header: dict[str, Any], *, ok: bool = True) -> None:
    """Raises the error a reply carries; `ok`: the reply must say {"ok": true} otherwise (the
    `info` answer is a bare map)."""
    if "error" in header:
        retry = header.get("retry_after")
        raise RemoteError(
            peer,
            str(header["error"])[:64],
            str(header.get("message", ""))[:500],
            retry_after=float(retry) if type(retry) in (int, float) else None,
        )
    if ok and header.get("ok") is not True:
        raise BadReply(peer, "neither ok nor error")


def _check_tensor(
    peer: str, out: list[torch.Tensor], like: torch.Tensor, shape: tuple[int, ...] | None = None
) -> torch.Tensor:
    """The one tensor of an answer, which must have `shape` (default: `like`'s) and a float
    dtype; returned in `like`'s dtype (a lossy codec may answer in another float type)."""
    if len(out) != 1:
        raise BadReply(peer, f"{len(out)} tensors instead of 1")
    t = out[0]
    want = tuple(like.shape) if shape is None else shape
    if tuple(t.shape) != want or not t.dtype.is_floating_point:
        raise BadReply(peer, f"answer {t.dtype} {tuple(t.shape)}, asked {want}")
    return t.to(like.dtype)


def _extras(
    tensors: list[torch.Tensor], mask: torch.Tensor | None, positions: torch.Tensor | None
) -> dict[str, Any]:
    """Appends the optional tensors in wire order (mask, then position ids last, flagged in the
    header); returns the header keys that announce them."""
    if mask is not None:
        tensors.append(mask)
    if positions is not None:
        tensors.append(positions.to(torch.int64))
        return {"positions": True}
    return {}


def _tuned(tensors: list[torch.Tensor], tuning: Tuning | None) -> dict[str, Any]:
    """Appends a request's named fine-tuning tensors (after everything else, as the protocol
    wants them); returns the header fields that name them."""
    if not tuning:
        return {}
    tensors.extend(t.detach().contiguous() for t in tuning.tensors)
    return tuning.header()


def _check_named(
    peer: str, reply: dict[str, Any], out: list[torch.Tensor], tuning: Tuning | None
) -> list[torch.Tensor]:
    """The named tensors' gradients after the input gradient of a backward reply: one per
    tensor sent, in the order named, each of its tensor's shape; returned in its dtype."""
    sent = tuning.named if tuning else {}
    if not sent:
        return []
    if reply.get("named") != list(sent) or len(out) != 1 + len(sent):
        raise BadReply(peer, f"gradients of {reply.get('named')!r}, asked for {list(sent)}")
    grads = []
    for (name, t), g in zip(sent.items(), out[1:], strict=True):
        if g.shape != t.shape or not g.dtype.is_floating_point:
            raise BadReply(peer, f"gradient of {name}: {g.dtype} {tuple(g.shape)}")
        grads.append(g.to(t.dtype))
    return grads


async def exchange(
    stream: Any,
    peer: str,
    header: dict[str, Any],
    tensors: Sequence[torch.Tensor],
    *,
    timeout: float,
    codec: str = "none",
    ok: bool = True,
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Writes one message and reads the answer; error replies raise `RemoteError`. Not
    cancel-safe for the stream: after a timeout or cancellation it must be reset."""
    try:
        with trio.fail_after(timeout):
            await write_message(stream, header, tensors, codec=codec)
    except trio.TooSlowError:
        raise PeerUnavailable(f"{peer}: could not send within {timeout:.1f} s", peer=peer) from None
    except Exception as e:  # py-libp2p reports a broken stream in many types
        raise PeerUnavailable(f"{peer}: {type(e).__name__}: {e}", peer=peer) from None
    return await _read_reply(stream, peer, timeout, None, ok=ok)


async def _read_reply(
    stream: Any, peer: str, timeout: float, stamps: list[int] | None, *, ok: bool = True
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Reads one answer within `timeout`; error replies raise `RemoteError`. `stamps`
    (petald.wire.trace): gets the times when the answer's header was in and when its tensors
    were decoded."""
    try:
        with trio.fail_after(timeout):
            reply, out = await read_message(stream, stamps=stamps)
            if stamps is not None:
                stamps.append(trace.now())
    except trio.TooSlowError:
        raise PeerUnavailable(
            f"{peer}: no answer within {timeout:.1f} s", peer=peer, stalled=True
        ) from None
    except WireError as e:  # garbage, or a stream that ended mid-message
        raise BadReply(peer, str(e)) from None
    except PetaldError:
        raise
    except Exception as e:  # py-libp2p reports a broken stream in many types
        raise PeerUnavailable(f"{peer}: {type(e).__name__}: {e}", peer=peer) from None
    _check_reply(peer, reply, ok=ok)
    return reply, out


async def close_stream(stream: Any, *, reset: bool = False) -> None:
    """Closes (or resets) without raising: the stream may already be gone with its peer.
    Shielded, so that a cancelled caller still releases the stream (the server's session and
    its cache tokens end with it)."""
    with trio.move_on_after(1.0) as scope, contextlib.suppress(Exception):
        scope.shield = True
        await (stream.reset() if reset else stream.close())


async def _one_shot(
    opener: StreamOpener,
    peer: str,
    protocol: TProtocol,
    header: dict[str, Any],
    tensors: list[torch.Tensor],
    *,
    timeout: float,
    ok: bool = True,
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    stream = await opener(peer, protocol)
    done = False
    try:
        answer = await exchange(stream, peer, header, tensors, timeout=timeout, ok=ok)
        done = True
        return answer
    finally:
        await close_stream(stream, reset=not done)


async def call_info(opener: StreamOpener, peer: str, *, timeout: float) -> dict[str, Any]:
    header, _ = await _one_shot(opener, peer, INFO_PROTOCOL, {}, [], timeout=timeout, ok=False)
    if not isinstance(header.get("model"), str):
        raise BadReply(peer, "info names no model")
    return header


async def call_forward(
    opener: StreamOpener,
    peer: str,
    blocks: BlockRange,
    hidden: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    all_hidden: bool = False,
    tuning: Tuning | None = None,
    timeout: float,
) -> torch.Tensor:
    """`hidden` (batch, seq, hidden) through `blocks` on `peer`; same shape out, or with
    `all_hidden` every block's output stacked: (len(blocks), batch, seq, hidden). `tuning`:
    deep prompts / LoRA / a server adapter for this request, over exactly `blocks`."""
    tensors = [hidden]
    header = {"start": blocks.start, "end": blocks.end, **_extras(tensors, mask, positions)}
    header |= _tuned(tensors, tuning)
    shape = None
    if all_hidden:
        header["all_hidden"] = True
        shape = (len(blocks), *hidden.shape)
    _, out = await _one_shot(opener, peer, FORWARD_PROTOCOL, header, tensors, timeout=timeout)
    return _check_tensor(peer, out, hidden, shape)


async def call_backward(
    opener: StreamOpener,
    peer: str,
    blocks: BlockRange,
    hidden: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    tuning: Tuning | None = None,
    timeout: float,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The gradient of `blocks`' input, given its input `hidden` and its output's gradient;
    and the gradients of `tuning`'s named tensors, in their order (empty without any)."""
    tensors = [hidden, grad_out]
    header = {"start": blocks.start, "end": blocks.end, **_extras(tensors, mask, positions)}
    header |= _tuned(tensors, tuning)
    reply, out = await _one_shot(opener, peer, BACKWARD_PROTOCOL, header, tensors, timeout=timeout)
    named = _check_named(peer, reply, out, tuning)
    return _check_tensor(peer, out[:1], hidden), named


class InferenceStream:
    """One server's part of an inference session: `open`, then `step`s, then `close`. Steps
    are sequential (one request in flight per stream, as the protocol has no ids in flight).
    In pass-on mode a step is `send_step` to every server of the route, then `receive_step`
    from each in order (petald.server.push)."""

    def __init__(
        self, stream: Any, peer: str, blocks: BlockRange, timeout: float, token: bytes | None
    ) -> None:
        self.stream = stream
        self.peer = peer
        self.blocks = blocks
        self.timeout = timeout
        # The server's session token, which lets another server push into this session; None
        # where the server does not take pushes.
        self.token = token
        self.closed = False
        self._stamps: list[int] | None = None

    @classmethod
    async def open(
        cls,
        opener: StreamOpener,
        peer: str,
        blocks: BlockRange,
        *,
        max_length: int,
        batch: int,
        codec: str = "none",
        timeout: float,
    ) -> InferenceStream:
        """Opens a session on `peer` for `blocks`; "busy" comes back as `RemoteError`."""
        stream = await opener(peer, INFERENCE_PROTOCOL)
        header = {
            "max_length": max_length,
            "batch": batch,
            "start": blocks.start,
            "end": blocks.end,
            "codec": codec,
        }
        try:
            reply, _ = await exchange(stream, peer, header, [], timeout=timeout)
        except BaseException:
            await close_stream(stream, reset=True)
            raise
        token = reply.get("session")
        token = token if isinstance(token, bytes) and len(token) == SESSION_TOKEN_BYTES else None
        return cls(stream, peer, blocks, timeout, token)

    async def step(
        self,
        step_id: int,
        position: int,
        hidden: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        reorder: list[int] | None = None,
        tuning: Tuning | None = None,
    ) -> torch.Tensor:
        """Runs `hidden` (batch, n, hidden) at `position`; a position below the server's cached
        length rolls its cache back first, and `reorder` (one index per sequence) reorders the
        cache along the batch before that (beam search). `tuning` (over this stream's blocks)
        applies to this step only. Any failure leaves the stream reset and closed."""
        await self.send_step(
            step_id,
            position,
            hidden,
            mask=mask,
            positions=positions,
            reorder=reorder,
            tuning=tuning,
        )
        output, _ = await self.receive_step(step_id, position, hidden)
        return output

    async def send_step(
        self,
        step_id: int,
        position: int,
        hidden: torch.Tensor | None,
        *,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        reorder: list[int] | None = None,
        tuning: Tuning | None = None,
        upstream: str | None = None,
        next_hop: InferenceStream | None = None,
    ) -> None:
        """Sends a step; `hidden` None: the server takes it from `upstream`'s push. `next_hop`:
        the server pushes its output into that session too."""
        if self.closed:
            raise PeerUnavailable(f"{self.peer}: session stream is closed", peer=self.peer)
        self._stamps = [trace.now()] if trace.ENABLED else None
        tensors = [] if hidden is None else [hidden]
        header = {"step": step_id, "position": position, **_extras(tensors, mask, positions)}
        header |= _tuned(tensors, tuning)
        if reorder is not None:
            header["reorder"] = reorder
        if upstream is not None:
            header["upstream"] = upstream
        if next_hop is not None and next_hop.token is not None:
            header["next"] = {"peer": next_hop.peer, "session": next_hop.token}
        if self._stamps is not None:
            header["trace"] = True
        stamps = self._stamps
        try:
            with trio.fail_after(self.timeout):
                if stamps is not None:
                    stamps.append(trace.now())
                await write_message(self.stream, header, tensors)
                if stamps is not None:
                    stamps.append(trace.now())
        except trio.TooSlowError:
            await self.close(reset=True)
            raise PeerUnavailable(f"{self.peer}: could not send a step", peer=self.peer) from None
        except Exception as e:  # py-libp2p reports a broken stream in many types
            await self.close(reset=True)
            raise PeerUnavailable(f"{self.peer}: {type(e).__name__}: {e}", peer=self.peer) from None
        except BaseException:
            await self.close(reset=True)
            raise

    async def receive_step(
        self, step_id: int, position: int, like: torch.Tensor
    ) -> tuple[torch.Tensor, bool]:
        """The answer to step `step_id` (its output, shaped like `like`), and whether the
        server pushed it on. Answers to earlier steps still in the stream are skipped: a
        server that got a step's hidden state both pushed and from us answers twice."""
        stamps = self._stamps
        want = position + like.shape[1]
        try:
            for _ in range(MAX_STALE_ANSWERS + 1):
                reply, out = await _read_reply(self.stream, self.peer, self.timeout, stamps)
                got = (reply.get("step"), reply.get("position"))
                if type(got[0]) is int and got[0] < step_id:
                    continue
                if got != (step_id, want):
                    raise BadReply(self.peer, f"step/position {got}, expected {(step_id, want)}")
                break
            else:
                raise BadReply(self.peer, "too many answers to earlier steps")
            output = _check_tensor(self.peer, out, like)
            if stamps is not None:
                # c: entered, before write, after write, reply header in, decoded, checked.
                stamps.append(trace.now())
                record = {"kind": "hop", "peer": self.peer, "blocks": str(self.blocks)}
                trace.RECORDS.append({**record, "c": stamps, **trace.server_stamps(reply)})
            return output, reply.get("pushed") is True
        except RemoteError as e:
            if e.is_bad_input:  # the session is still good on the server
                raise
            await self.close(reset=True)
            raise
        except BaseException:
            await self.close(reset=True)
            raise

    async def close(self, *, reset: bool = False) -> None:
        """Ends the session (the server frees its cache tokens at once). Idempotent."""
        if self.closed:
            return
        self.closed = True
        if not reset:
            with trio.move_on_after(1.0), contextlib.suppress(Exception):
                await write_message(self.stream, {"close": True})
        await close_stream(self.stream, reset=reset)
