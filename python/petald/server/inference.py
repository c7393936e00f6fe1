"""`/petald/inference/1.0.0`: one stream per inference session, with the session's KV cache kept
on the server between steps.

    client: {"max_length", "batch", "start", "end", "codec"}         open
    server: {"ok": true} | {"error": "busy", "retry_after", ...}
    client: {"step": id, "position": p, "positions"?} + [hidden (batch, n, hidden), mask?,
            position_ids?]                                           repeated
    server: {"ok": true, "step": id, "position": p + n} + [output]
    client: {"close": true}                                          (or just end the stream)

`position` below the cached length rolls the cache back (speculative decoding, edits);
`"reorder": [i, ...]` (one index per sequence) reorders the cache along the batch first (beam
search). A step
that repeats the last step's id and position is a retransmission: the stored answer is sent again
and nothing is applied twice. A bad step gets an error reply and leaves the cache as it was.
Tokens are reserved from the `CacheBudget` on open and returned however the session ends."""

from __future__ import annotations

import itertools
import logging
from collections import Counter
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
from petald.wire import trace
from petald.wire.frames import Frame
from petald.wire.messages import read_message, write_message
from petald.wire.protocols import INFERENCE_PROTOCOL

log = logging.getLogger(__name__)


class InferenceSessions:
    def __init__(self, blocks: BlockHandlers) -> None:
        self.blocks = blocks
        self.executor = blocks.executor
        self.budget = blocks.budget
        self._per_peer: Counter[Any] = Counter()
        self._ids = itertools.count(1)

    def register(self, host: IHost) -> None:
        host.set_stream_handler(INFERENCE_PROTOCOL, self._on_session)

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
                    header, _ = await read_message(stream, max_tensor_bytes=0)
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
            await write_message(stream, {"ok": True, "free_tokens": self.budget.free_tokens})
            await self._steps(stream, sid, request, header.get("codec", "none"))
        except Exception as e:  # a broken session must never take the daemon down
            log.debug("inference session from %s ended: %s", peer, e)
            await reset_stream(stream)
        finally:
            if reserved:
                with trio.CancelScope(shield=True):
                    await self.executor.call({"op": "close", "sid": sid}, priority=INFERENCE)
                self.budget.release(reserved)
                self._per_peer[peer] -= 1
                if not self._per_peer[peer]:
                    del self._per_peer[peer]
            self.blocks.end()

    def _check_step(
        self, header: dict[str, Any], tensors: list[Frame], session: dict[str, Any]
    ) -> dict[str, Any]:
        position = header.get("position", session["position"])
        if type(position) is not int or not 0 <= position <= session["position"]:
            raise BadRequest(
                "bad_position", f"position must be 0..{session['position']} (the cached tokens)"
            )
        if not tensors:
            raise BadRequest("bad_step", "send {step, position} + [hidden, mask?, positions?]")
        tensors, tuning = check_tuning(header, tensors)
        batch, n = self.blocks.check_hidden(tensors[0])
        if batch != session["batch"]:
            raise BadRequest("bad_shape", f"the session is for a batch of {session['batch']}")
        if position + n > session["max_length"]:
            raise BadRequest(
                "too_long", f"{position} + {n} tokens exceed max_length {session['max_length']}"
            )
        flags = check_extras(header, tensors[1:], batch, position + n, n)
        reorder = header.get("reorder")
        if reorder is not None and not (
            isinstance(reorder, list)
            and len(reorder) == batch
            and all(type(i) is int and 0 <= i < batch for i in reorder)
        ):
            raise BadRequest("bad_reorder", f"reorder must list {batch} indices in [0, {batch})")
        work = {"op": "step", "sid": session["sid"], "position": position, **flags, **tuning}
        work["codec"] = session["codec"]  # the compute process frames the answer; we pass it on
        return work | ({"reorder": reorder} if reorder is not None else {})

    async def _steps(self, stream: INetStream, sid: int, request: dict, codec: str) -> None:
        session = {**request, "sid": sid, "position": 0, "codec": codec}
        last: tuple[Any, int, Frame] | None = None  # (step id, position, output as sent)
        while True:
            arrived: list[int] = []  # petald.wire.trace: when the header was in
            with trio.move_on_after(SESSION_IDLE_TIMEOUT) as idle:
                header, tensors = await read_message(stream, stamps=arrived, frames=True)
            if idle.cancelled_caught or header.get("close"):
                await stream.close()
                return
            step, position = header.get("step"), header.get("position", session["position"])
            if last is not None and step == last[0] and position == last[1]:
                # A retransmission (the client lost our answer): answer again, apply nothing.
                done = {"ok": True, "step": step, "position": session["position"]}
                await write_message(stream, done, [last[2]])
                continue
            stamps = [*arrived, trace.now()] if header.get("trace") is True else None
            try:
                work = self._check_step(header, tensors, session)
            except BadRequest as e:
                await self._reply_error(stream, e.code, str(e))
                continue
            if stamps is not None:
                work["trace"] = True
                stamps.append(trace.now())
            reply, out = await self.executor.call(work, tensors, priority=INFERENCE)
            if stamps is not None:
                stamps.append(trace.now())
            if "error" in reply:
                await write_message(stream, reply)
                continue
            session["position"] = reply["position"]
            last = (step, position, out[0])
            done = {"ok": True, "step": step, "position": session["position"]}
            if stamps is not None:
                # d: header in, decoded, checked, the compute process's answer decoded, before
                # our write; w: the compute process's own (header in, decoded, computed, before
                # its write).
                done["trace"] = {"d": [*stamps, trace.now()], "w": reply.get("trace", [])}
            await write_message(stream, done, out)
