"""`/petald/inference/1.0.0`: one stream per inference session, with the session's KV cache kept
on the server between steps.

    client: {"max_length", "batch", "start", "end", "codec"}         open
    server: {"ok": true, "session": token} | {"error": "busy", "retry_after", ...}
    client: {"step": id, "position": p, "positions"?} + [hidden (batch, n, hidden), mask?,
            position_ids?]                                           repeated
    server: {"ok": true, "step": id, "position": p + n} + [output]
    client: {"close": true}                                          (or just end the stream)

Steps of different sessions waiting at the same time run as one batched forward
(petald.server.batching); a session sees the same answers as alone.
`position` below the cached length rolls the cache back (speculative decoding, edits);
`"reorder": [i, ...]` (one index per sequence) reorders the cache along the batch first (beam
search). A step that repeats the last step's id and position is a retransmission: the stored
answer is sent again and nothing is applied twice. A bad step gets an error reply and leaves the
cache as it was. Tokens are reserved from the `CacheBudget` on open and returned however the
session ends.

Servers passing activations on (petald.server.push): a step with `"next": {"peer", "session"}`
also pushes its output into that server's session (the reply says `"pushed": bool`); a step with
`"upstream": peer` and no hidden state waits for that peer's push of the same step id and
position, or for the client to send the step with its hidden state after all (it supersedes)."""

from __future__ import annotations

import itertools
import logging
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import IHost, INetStream

from petald.errors import CodecError, FrameError, MessageError
from petald.server.executor import INFERENCE
from petald.server.handlers import (
    CODECS,
    BadRequest,
    BlockHandlers,
    check_extras,
    check_tuning,
    reset_stream,
)
from petald.server.memory import MAX_SESSIONS_PER_PEER, SESSION_IDLE_TIMEOUT, Busy
from petald.server.push import TOKEN_BYTES, Pushed, PushLink, PushRegistry, StreamOpener
from petald.wire import trace
from petald.wire.frames import Frame
from petald.wire.messages import read_message, write_message
from petald.wire.protocols import INFERENCE_PROTOCOL

log = logging.getLogger(__name__)

# Messages (the client's and pushes) a session holds before its readers wait: one step in
# flight, a push racing its step header, and a close.
INBOX_SIZE = 4
# Pushes kept for steps not yet announced by the client (a push may overtake its step header).
MAX_PUSHED = 4


class InferenceSessions:
    def __init__(self, blocks: BlockHandlers, open_stream: StreamOpener | None = None) -> None:
        self.blocks = blocks
        # Opens streams to other servers (pushes); None: this server pushes nowhere.
        self.open_stream = open_stream
        self.pushes = PushRegistry()
        self.executor = blocks.executor
        # Steps are batched across sessions (petald.server.batching); `info`'s `served` shows
        # the forwards run for them, by sessions in each.
        blocks.served["inference"] = self.executor.step_forwards
        self.budget = blocks.budget
        self._per_peer: Counter[Any] = Counter()
        self._ids = itertools.count(1)

    def register(self, host: IHost) -> None:
        host.set_stream_handler(INFERENCE_PROTOCOL, self._on_session)
        self.pushes.register(host)

    def _open(self, header: dict[str, Any]) -> dict[str, Any]:
        """The compute process's `open` request for a valid session header."""
        start, end = self.blocks.check_blocks(header)
        batch, max_length = header.get("batch"), header.get("max_length")
        limits = self.blocks.limits
        if type(batch) is not int or not 0 < batch <= limits.max_batch:
            raise BadRequest("bad_batch", f"batch must be 1..{limits.max_batch}")
        if type(max_length) is not int or not 0 < max_length <= limits.max_tokens:
            raise BadRequest("bad_length", f"max_length must be 1..{limits.max_tokens}")
        if header.get("codec", "none") not in CODECS:
            raise BadRequest("bad_codec", f"codec must be one of {CODECS}")
        if self.blocks.state != "online":
            raise BadRequest(self.blocks.state, f"the server is {self.blocks.state}; use another")
        return {"op": "open", "batch": batch, "max_length": max_length, "start": start, "end": end}

    async def _reply_error(self, stream: INetStream, code: str, message: str, **extra) -> None:
        await write_message(stream, {"error": code, "message": message, **extra})

    async def _on_session(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        reserved, sid = 0, next(self._ids)
        self.blocks.begin()
        try:
            with trio.fail_after(SESSION_IDLE_TIMEOUT):
                try:
                    header, _ = await read_message(stream, max_tensor_bytes=0, frames=True)
                except (MessageError, FrameError, CodecError) as e:  # e.g. a step, not an open
                    await self._reply_error(stream, "malformed", f"expected an open header: {e}")
                    await stream.close()
                    return
            try:
                request = self._open(header)
                if self._per_peer[peer] >= MAX_SESSIONS_PER_PEER:
                    raise BadRequest(
                        "too_many_sessions", f"at most {MAX_SESSIONS_PER_PEER} per peer"
                    )
                self.budget.reserve(request["batch"] * request["max_length"])
            except Busy as e:
                await self._reply_error(stream, "busy", str(e), retry_after=e.retry_after)
                await stream.close()
                return
            except BadRequest as e:
                await self._reply_error(stream, e.code, str(e))
                await stream.close()
                return
            reserved = request["batch"] * request["max_length"]
            self._per_peer[peer] += 1
            reply, _ = await self.executor.call({**request, "sid": sid}, priority=INFERENCE)
            if "error" in reply:
                await write_message(stream, reply)
                await stream.close()
                return
            codec = header.get("codec", "none")
            session = _Session(sid, request["batch"], request["max_length"], codec)
            await self._serve_session(stream, session)
        except Exception as e:  # a broken session must never take the daemon down
            log.debug("inference session from %s ended: %s", peer, e)
            await reset_stream(stream)
        finally:
            if reserved:
                self.executor.forget(sid)
                with trio.CancelScope(shield=True):
                    await self.executor.call({"op": "close", "sid": sid}, priority=INFERENCE)
                self.budget.release(reserved)
                self._per_peer[peer] -= 1
                if not self._per_peer[peer]:
                    del self._per_peer[peer]
            self.blocks.end()

    async def _serve_session(self, stream: INetStream, session: _Session) -> None:
        """Answers the session's steps until it closes or idles out. Its client's messages and
        the pushes into it (petald.server.push) arrive on one channel, in arrival order."""
        send, inbox = trio.open_memory_channel[Any](INBOX_SIZE)
        token = self.pushes.add(send)
        try:
            with inbox:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_read_client, stream, send.clone())
                    reply = {"ok": True, "free_tokens": self.budget.free_tokens, "session": token}
                    await write_message(stream, reply)
                    await self._steps(stream, session, inbox)
                    nursery.cancel_scope.cancel()
        finally:
            self.pushes.remove(token)
            await send.aclose()
            if session.link is not None:
                await session.link.close()

    def _check_step(
        self, header: dict[str, Any], tensors: list[Frame], session: _Session
    ) -> dict[str, Any]:
        position = header.get("position", session.position)
        if type(header.get("step")) is not int:
            raise BadRequest("bad_step", "step must be an integer id")
        if type(position) is not int or not 0 <= position <= session.position:
            raise BadRequest(
                "bad_position", f"position must be 0..{session.position} (the cached tokens)"
            )
        if not tensors:
            raise BadRequest("bad_step", "send {step, position} + [hidden, mask?, positions?]")
        tensors, tuning = check_tuning(header, tensors)
        batch, n = self.blocks.check_hidden(tensors[0])
        if batch != session.batch:
            raise BadRequest("bad_shape", f"the session is for a batch of {session.batch}")
        if position + n > session.max_length:
            raise BadRequest(
                "too_long", f"{position} + {n} tokens exceed max_length {session.max_length}"
            )
        flags = check_extras(header, tensors[1:], batch, position + n, n)
        reorder = header.get("reorder")
        if reorder is not None and not (
            isinstance(reorder, list)
            and len(reorder) == batch
            and all(type(i) is int and 0 <= i < batch for i in reorder)
        ):
            raise BadRequest("bad_reorder", f"reorder must list {batch} indices in [0, {batch})")
        _check_next(header)
        work = {"op": "step", "sid": session.sid, "position": position, **flags, **tuning}
        work["codec"] = session.codec  # the compute process frames the answer; we pass it on
        return work | ({"reorder": reorder} if reorder is not None else {})

    async def _steps(
        self, stream: INetStream, session: _Session, inbox: trio.MemoryReceiveChannel[Any]
    ) -> None:
        while True:
            with trio.move_on_after(SESSION_IDLE_TIMEOUT) as idle:
                item = await inbox.receive()
            if idle.cancelled_caught:
                await stream.close()
                return
            if isinstance(item, Pushed):
                session.pushed.append(item)
                await self._run_pending(stream, session)
                continue
            if isinstance(item, BaseException):  # the client's stream broke or sent garbage
                raise item
            header, tensors, arrived = item
            if header.get("close"):
                await stream.close()
                return
            step, position = header.get("step"), header.get("position", session.position)
            last = session.last
            if last is not None and step == last[0] and position == last[1]:
                # A retransmission (the client lost our answer, or relays a hidden state it did
                # not know was pushed to us): answer again, apply nothing.
                session.pending = None
                done = {"ok": True, "step": step, "position": session.position}
                await write_message(stream, done, [last[2]])
                continue
            if "upstream" in header:  # its hidden state comes from the previous server
                if not isinstance(header["upstream"], str) or len(header["upstream"]) > 128:
                    await self._reply_error(stream, "bad_step", "upstream must be a peer id")
                    continue
                session.pending = (header, tensors, arrived)
                await self._run_pending(stream, session)
                continue
            session.pending = None  # the client sent the hidden state itself instead
            await self._run(stream, session, header, tensors, arrived)

    async def _run_pending(self, stream: INetStream, session: _Session) -> None:
        """Runs the step waiting for its hidden state once the named upstream pushed it."""
        if session.pending is None:
            return
        header, tensors, arrived = session.pending
        want = (header["upstream"], header.get("step"), header.get("position", session.position))
        for p in session.pushed:
            if (p.peer, p.step, p.position) == want:
                session.pushed.remove(p)
                session.pending = None
                await self._run(stream, session, header, [p.hidden, *tensors], arrived)
                return

    async def _run(
        self,
        stream: INetStream,
        session: _Session,
        header: dict[str, Any],
        tensors: list[Frame],
        arrived: list[int],
    ) -> None:
        step, position = header.get("step"), header.get("position", session.position)
        stamps = [*arrived, trace.now()] if header.get("trace") is True else None
        try:
            work = self._check_step(header, tensors, session)
        except BadRequest as e:
            await self._reply_error(stream, e.code, str(e))
            return
        if stamps is not None:
            work["trace"] = True
            stamps.append(trace.now())
        reply, out = await self.executor.step(session.sid, work, tensors)
        if stamps is not None:
            stamps.append(trace.now())
        if "error" in reply:
            await write_message(stream, reply)
            return
        session.position = reply["position"]
        session.last = (step, position, out[0])
        done: dict[str, Any] = {"ok": True, "step": step, "position": session.position}
        target = _check_next(header)
        if target is not None:  # the next server first: it is what the client waits for
            done["pushed"] = await self._push(session, target, step, position, out[0])
        if stamps is not None:
            # d: header in, decoded, checked, the compute process's answer decoded, before
            # our write; w: the compute process's own (header in, decoded, computed, before
            # its write).
            done["trace"] = {"d": [*stamps, trace.now()], "w": reply.get("trace", [])}
        await write_message(stream, done, out)

    async def _push(
        self, session: _Session, target: tuple[str, bytes], step: Any, position: int, out: Frame
    ) -> bool:
        if self.open_stream is None:
            return False
        link = session.link
        if link is None or (link.peer, link.token) != target:
            if link is not None:
                await link.close()
            link = session.link = PushLink(self.open_stream, *target)
        return await link.push(step, position, out)


@dataclass
class _Session:
    sid: int
    batch: int
    max_length: int
    codec: str
    position: int = 0
    last: tuple[Any, int, Frame] | None = None  # (step id, position, output as sent)
    # A step whose hidden state comes from the upstream server: (header, other tensors, stamps).
    pending: tuple[dict[str, Any], list[Frame], list[int]] | None = None
    pushed: deque[Pushed] = field(default_factory=lambda: deque(maxlen=MAX_PUSHED))
    link: PushLink | None = None  # into the next server's session


def _check_next(header: dict[str, Any]) -> tuple[str, bytes] | None:
    """`"next": {"peer", "session"}`: where to push this step's output, or None."""
    target = header.get("next")
    if target is None:
        return None
    peer = target.get("peer") if isinstance(target, dict) else None
    token = target.get("session") if isinstance(target, dict) else None
    if not isinstance(peer, str) or not 0 < len(peer) <= 128 or not isinstance(token, bytes):
        raise BadRequest("bad_next", "next must be {peer: a peer id, session: its token}")
    if len(token) != TOKEN_BYTES:
        raise BadRequest("bad_next", f"a session token has {TOKEN_BYTES} bytes")
    return peer, token


async def _read_client(stream: INetStream, send: trio.MemorySendChannel[Any]) -> None:
    """Reads the client's messages into the session's channel; the first error ends it (and
    the session, which raises it)."""
    async with send:
        while True:
            arrived: list[int] = []  # petald.wire.trace: when the header was in
            try:
                header, tensors = await read_message(stream, stamps=arrived, frames=True)
            except Exception as e:
                await send.send(e)
                return
            await send.send((header, tensors, arrived))
            if header.get("close"):
                return
