"""The block RPCs a server answers on libp2p streams, one request and one response per stream
(petald.wire.messages: CBOR header + tensor frames):

- `/petald/info/1.0.0`: model, span, dtype, limits, version.
- `/petald/forward/1.0.0`: hidden states (batch, seq, hidden) through blocks [start, end) of the
  span (any sub-range), optional attention mask; answer: the output hidden states.
- `/petald/backward/1.0.0`: the same inputs plus the gradient of the output; the server
  recomputes the forward (it keeps no activations between requests) and answers the gradient of
  the input hidden states. The blocks stay frozen.

Every request is validated at the edge (block range inside the span, shapes, dtypes, sizes) and
answered with `{"error": code, "message": ...}` instead of the tensors when it is bad, so a
client learns what to fix and the server keeps serving. Torch work runs in a worker thread under
one capacity limiter per device, so the trio loop keeps answering the DHT and gossip meanwhile.
Entry point: `BlockHandlers(span, ...).register(host)`."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol

from petald import __version__
from petald.errors import CodecError, FrameError, MessageError
from petald.server.blocks import Span
from petald.wire.messages import read_message, write_message

log = logging.getLogger(__name__)

INFO_PROTOCOL = TProtocol("/petald/info/1.0.0")
FORWARD_PROTOCOL = TProtocol("/petald/forward/1.0.0")
BACKWARD_PROTOCOL = TProtocol("/petald/backward/1.0.0")
CODECS = ("none", "zstd", "fp16", "bf16", "int8", "int8-256", "int8+zstd")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; announced in `info` so clients can split work."""

    max_batch: int = 64
    max_tokens: int = 8192  # batch * seq per forward
    request_timeout: float = 300.0  # seconds for reading, computing and answering one request


class BadRequest(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class BlockHandlers:
    def __init__(self, span: Span, model: str, *, limits: Limits | None = None) -> None:
        self.span = span
        self.model = model
        self.limits = limits or Limits()
        # One device, one limiter: requests queue here instead of fighting over the device.
        self.limiter = trio.CapacityLimiter(1)

    def info(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "blocks": [self.span.blocks.start, self.span.blocks.end],
            "hidden_size": int(self.span.config.hidden_size),
            "dtype": str(self.span.dtype).removeprefix("torch."),
            "version": __version__,
            "codecs": list(CODECS),
            "limits": {"max_batch": self.limits.max_batch, "max_tokens": self.limits.max_tokens},
        }

    def register(self, host: IHost) -> None:
        host.set_stream_handler(INFO_PROTOCOL, self._on_info)
        host.set_stream_handler(FORWARD_PROTOCOL, self._on_forward)
        host.set_stream_handler(BACKWARD_PROTOCOL, self._on_backward)

    async def _on_info(self, stream: INetStream) -> None:
        with trio.move_on_after(self.limits.request_timeout):
            try:
                await read_message(stream, max_tensor_bytes=0)
                await write_message(stream, self.info())
                await stream.close()
            except Exception as e:  # a broken stream from a peer must not take us down
                log.debug("info request failed: %s", e)
                await reset_stream(stream)

    def _check(
        self, header: dict[str, Any], tensors: list[torch.Tensor], *, backward: bool = False
    ) -> tuple:
        span = self.span.blocks
        start, end = header.get("start", span.start), header.get("end", span.end)
        ints = type(start) is int and type(end) is int
        if not ints or not span.start <= start < end <= span.end:
            raise BadRequest("bad_blocks", f"blocks {start}:{end} are not within served {span}")
        codec = header.get("codec", "none")
        if codec not in CODECS:
            raise BadRequest("bad_codec", f"codec must be one of {CODECS}")
        grads = 1 if backward else 0
        if len(tensors) not in (1 + grads, 2 + grads):
            what = "hidden states, output gradient" if backward else "hidden states"
            raise BadRequest("bad_tensors", f"send {what} and optionally an attention mask")
        hidden = tensors[0]
        if hidden.dim() != 3 or hidden.shape[-1] != self.span.config.hidden_size:
            raise BadRequest(
                "bad_shape", f"hidden states must be (batch, seq, {self.span.config.hidden_size})"
            )
        if not hidden.dtype.is_floating_point:
            raise BadRequest("bad_dtype", "hidden states must be a floating-point tensor")
        batch, seq = hidden.shape[0], hidden.shape[1]
        if not 0 < batch <= self.limits.max_batch or not 0 < batch * seq <= self.limits.max_tokens:
            raise BadRequest(
                "too_large",
                f"batch {batch} x seq {seq} is over the limits (batch <= {self.limits.max_batch}, "
                f"tokens <= {self.limits.max_tokens})",
            )
        if backward and (
            tensors[1].shape != hidden.shape or not tensors[1].dtype.is_floating_point
        ):
            raise BadRequest("bad_grad", "the output gradient must have the hidden states' shape")
        mask = tensors[1 + grads] if len(tensors) == 2 + grads else None
        if mask is not None and (mask.dim() != 2 or tuple(mask.shape) != (batch, seq)):
            raise BadRequest("bad_mask", "attention mask must be (batch, seq)")
        return hidden, mask, start, end, codec

    def _run_forward(self, hidden, mask, start, end) -> torch.Tensor:
        with torch.inference_mode():
            out = self.span.forward(hidden, start_block=start, end_block=end, attention_mask=mask)
        return out.to(hidden.dtype).cpu()

    def _run_backward(self, hidden, grad, mask, start, end) -> torch.Tensor:
        x = hidden.to(self.span.dtype).detach().requires_grad_(True)
        with torch.enable_grad():
            out = self.span.forward(x, start_block=start, end_block=end, attention_mask=mask)
            (grad_in,) = torch.autograd.grad(out, x, grad.to(out.dtype))
        return grad_in.to(hidden.dtype).cpu()

    async def _on_forward(self, stream: INetStream) -> None:
        await self._serve(stream, backward=False)

    async def _on_backward(self, stream: INetStream) -> None:
        await self._serve(stream, backward=True)

    async def _serve(self, stream: INetStream, *, backward: bool) -> None:
        """One request: read and validate, compute off the loop, answer; errors are replies."""
        with trio.move_on_after(self.limits.request_timeout):
            try:
                header, tensors = await read_message(stream)
                try:
                    hidden, mask, start, end, codec = self._check(
                        header, tensors, backward=backward
                    )
                except BadRequest as e:
                    await write_message(stream, {"error": e.code, "message": str(e)})
                    await stream.close()
                    return
                if backward:
                    args = (self._run_backward, hidden, tensors[1], mask, start, end)
                else:
                    args = (self._run_forward, hidden, mask, start, end)
                out = await trio.to_thread.run_sync(*args, limiter=self.limiter)
                await write_message(stream, {"ok": True}, [out], codec=codec)
                await stream.close()
            except (MessageError, FrameError, CodecError) as e:
                with contextlib.suppress(Exception):
                    await write_message(stream, {"error": "malformed", "message": str(e)})
                await reset_stream(stream)
            except Exception as e:  # never let a peer's stream crash the daemon
                log.warning("%s request failed: %s", "backward" if backward else "forward", e)
                await reset_stream(stream)


async def reset_stream(stream: INetStream) -> None:
    with contextlib.suppress(Exception):  # already closed or reset by the peer
        await stream.reset()
