"""`/petald/inference/1.0.0`: one stream per inference session, with the session's KV cache kept
on the server between steps.

    client: {"max_length", "batch", "start", "end", "codec"}         open
    server: {"ok": true} | {"error": "busy", "retry_after", ...}
    client: {"step": id, "position": p} + [hidden (batch, n, hidden), mask?]   repeated
    server: {"ok": true, "step": id, "position": p + n} + [output]
    client: {"close": true}                                          (or just end the stream)

`position` below the cached length rolls the cache back (speculative decoding, edits). A step
that repeats the last step's id and position is a retransmission: the stored answer is sent again
and nothing is applied twice. A bad step gets an error reply and leaves the cache as it was.
Tokens are reserved from the `CacheBudget` on open and returned however the session ends."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol

from petald.server.handlers import CODECS, BlockHandlers, reset_stream
from petald.server.memory import MAX_SESSIONS_PER_PEER, SESSION_IDLE_TIMEOUT, Busy, CacheBudget
from petald.wire.messages import read_message, write_message

log = logging.getLogger(__name__)

INFERENCE_PROTOCOL = TProtocol("/petald/inference/1.0.0")


class InferenceSessions:
    def __init__(self, blocks: BlockHandlers, budget: CacheBudget) -> None:
        self.blocks = blocks
        self.span = blocks.span
        self.budget = budget
        self._per_peer: Counter[Any] = Counter()

    def register(self, host: IHost) -> None:
        host.set_stream_handler(INFERENCE_PROTOCOL, self._on_session)

    def _open(self, header: dict[str, Any]) -> tuple[int, int, int, int, str]:
        span = self.span.blocks
        start, end = header.get("start", span.start), header.get("end", span.end)
        batch, max_length = header.get("batch"), header.get("max_length")
        codec = header.get("codec", "none")
        if not (type(start) is int and type(end) is int and span.start <= start < end <= span.end):
            raise ValueError(f"bad_blocks: blocks {start}:{end} are not within served {span}")
        limits = self.blocks.limits
        if type(batch) is not int or not 0 < batch <= limits.max_batch:
            raise ValueError(f"bad_batch: batch must be 1..{limits.max_batch}")
        if type(max_length) is not int or not 0 < max_length <= limits.max_tokens:
            raise ValueError(f"bad_length: max_length must be 1..{limits.max_tokens}")
        if codec not in CODECS:
            raise ValueError(f"bad_codec: codec must be one of {CODECS}")
        return start, end, batch, max_length, codec

    async def _reply_error(self, stream: INetStream, text: str, **extra: Any) -> None:
        code, _, message = text.partition(": ")
        await write_message(stream, {"error": code, "message": message or text, **extra})

    async def _on_session(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        reserved = 0
        try:
            with trio.move_on_after(SESSION_IDLE_TIMEOUT):
                header, _ = await read_message(stream, max_tensor_bytes=0)
            try:
                start, end, batch, max_length, codec = self._open(header)
                if self._per_peer[peer] >= MAX_SESSIONS_PER_PEER:
                    raise ValueError(f"too_many_sessions: at most {MAX_SESSIONS_PER_PEER} per peer")
                self.budget.reserve(batch * max_length)
            except Busy as e:
                await self._reply_error(stream, f"busy: {e}", retry_after=e.retry_after)
                await stream.close()
                return
            except ValueError as e:
                await self._reply_error(stream, str(e))
                await stream.close()
                return
            reserved = batch * max_length
            self._per_peer[peer] += 1
            cache = self.span.new_cache(batch, max_length, start_block=start, end_block=end)
            await write_message(stream, {"ok": True, "free_tokens": self.budget.free_tokens})
            await self._steps(stream, cache, codec)
        except Exception as e:  # a broken session must never take the daemon down
            log.debug("inference session from %s ended: %s", peer, e)
            await reset_stream(stream)
        finally:
            if reserved:
                self.budget.release(reserved)
                self._per_peer[peer] -= 1
                if not self._per_peer[peer]:
                    del self._per_peer[peer]

    async def _steps(self, stream: INetStream, cache: Any, codec: str) -> None:
        last: tuple[Any, int, torch.Tensor] | None = None  # (step id, position, output)
        while True:
            with trio.move_on_after(SESSION_IDLE_TIMEOUT) as idle:
                header, tensors = await read_message(stream)
            if idle.cancelled_caught or header.get("close"):
                await stream.close()
                return
            step, position = header.get("step"), header.get("position", cache.position)
            if last is not None and step == last[0] and position == last[1]:
                await write_message(
                    stream,
                    {"ok": True, "step": step, "position": cache.position},
                    [last[2]],
                    codec=codec,
                )
                continue
            if type(position) is not int or not tensors or len(tensors) > 2:
                await self._reply_error(stream, "bad_step: send {step, position} + [hidden, mask?]")
                continue
            hidden, mask = tensors[0], (tensors[1] if len(tensors) == 2 else None)
            try:
                out = await trio.to_thread.run_sync(
                    self._run_step, hidden, cache, position, mask, limiter=self.blocks.limiter
                )
            except ValueError as e:
                await self._reply_error(stream, f"bad_step: {e}")
                continue
            last = (step, position, out)
            await write_message(
                stream, {"ok": True, "step": step, "position": cache.position}, [out], codec=codec
            )

    def _run_step(self, hidden: torch.Tensor, cache: Any, position: int, mask: Any) -> torch.Tensor:
        if hidden.dim() != 3 or not hidden.dtype.is_floating_point:
            raise ValueError("hidden states must be a floating-point (batch, n, hidden) tensor")
        out = self.span.step(hidden, cache, position, attention_mask=mask)
        return out.to(hidden.dtype).cpu()
