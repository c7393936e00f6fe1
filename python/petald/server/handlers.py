"""The block RPCs a server answers on libp2p streams, one request and one response per stream
(petald.wire.messages: CBOR header + tensor frames):

- `/petald/info/1.0.0`: model, span, dtype, limits, version, and how many forward/backward
  requests were answered per batch size (`served`).
- `/petald/forward/1.0.0`: hidden states (batch, seq, hidden) through blocks [start, end) of the
  span (any sub-range), then optionally an attention mask (batch, seq) and, with header
  `"positions": true`, position ids (batch, seq) last; answer: the output hidden states, or with
  `"all_hidden": true` every block's output stacked (blocks, batch, seq, hidden).
- `/petald/backward/1.0.0`: the same inputs plus the gradient of the output; the server
  recomputes the forward (it keeps no activations between requests) and answers the gradient of
  the input hidden states. The blocks stay frozen.

Every request is validated at the edge (block range inside the span, shapes, dtypes, sizes) and
answered with `{"error": code, "message": ...}` instead of the tensors when it is bad, so a
client learns what to fix and the server keeps serving. Torch work runs in the compute process
(petald.server.executor), so this process's trio loop keeps answering the DHT, gossip and `info`
meanwhile. Entry point: `BlockHandlers(executor, ...).register(host)` once the span is loaded."""

from __future__ import annotations

import contextlib
import logging
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost, INetStream

from petald import __version__
from petald.errors import CodecError, FrameError, MessageError
from petald.server.executor import TRAINING, Executor
from petald.server.memory import CacheBudget
from petald.wire.frames import Frame
from petald.wire.messages import read_message, write_message
from petald.wire.protocols import BACKWARD_PROTOCOL, FORWARD_PROTOCOL, INFO_PROTOCOL

log = logging.getLogger(__name__)

CODECS = ("none", "zstd", "fp16", "bf16", "int8", "int8-256", "int8+zstd")
# Position ids beyond this are no real model's (and would make rotary tables huge).
MAX_POSITION = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; announced in `info` so clients can split work."""

    max_batch: int = 64
    max_tokens: int = 8192  # batch * seq per forward
    request_timeout: float = 300.0  # seconds for reading, computing and answering one request
    # Forward/backward requests one peer may have in flight: more only queues work that
    # starves everyone else (a client splits batches, it does not flood).
    max_requests_per_peer: int = 8


# Named fine-tuning tensors per request: deep prompts plus A/B for up to 8 LoRA targets.
MAX_NAMED = 17
_NAMED = re.compile(r"^(prompts|lora\.[A-Za-z_][A-Za-z0-9_.]{0,100}\.[AB])$")


class BadRequest(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def check_tuning(
    header: dict[str, Any], tensors: list[Frame]
) -> tuple[list[Frame], dict[str, Any]]:
    """Splits off the named fine-tuning tensors (petald.server.adapters) and checks their
    names and the header fields that go with them; returns (the regular tensors, the header
    fields for the compute process, which checks shapes against the blocks)."""
    named = header.get("named", [])
    if not isinstance(named, list) or len(named) > MAX_NAMED or len(set(named)) != len(named):
        raise BadRequest("bad_named", f"named: a list of at most {MAX_NAMED} distinct names")
    if not all(isinstance(n, str) and _NAMED.match(n) for n in named):
        raise BadRequest("bad_named", "names are 'prompts' or 'lora.<layer path>.A|B'")
    if len(named) >= len(tensors):
        raise BadRequest("bad_tensors", "the named tensors come after the regular ones")
    for n, t in zip(named, tensors[len(tensors) - len(named) :], strict=True):
        if not t.is_float or not 2 <= t.ndim <= 4:
            raise BadRequest("bad_named", f"{n} must be a floating-point tensor of 2 to 4 dims")
    fields: dict[str, Any] = {"named": named} if named else {}
    scale = header.get("lora_scale", 1.0)
    if type(scale) not in (int, float) or not abs(scale) <= 1e4:
        raise BadRequest("bad_named", "lora_scale must be a number of magnitude <= 1e4")
    if scale != 1.0:
        fields["lora_scale"] = float(scale)
    adapter = header.get("active_adapter")
    if adapter is not None:
        if not isinstance(adapter, str) or not 0 < len(adapter) <= 128:
            raise BadRequest("bad_adapter", "active_adapter must be an adapter's name")
        fields["active_adapter"] = adapter
    return tensors[: len(tensors) - len(named)], fields


def check_extras(
    header: dict[str, Any], extras: list[Frame], batch: int, mask_len: int, seq: int
) -> dict[str, bool]:
    """Validates the optional tensors after the required ones: an attention mask
    (batch, mask_len) and, when `header["positions"]` is true, position ids (batch or 1, seq)
    last. Returns the flags the compute process reads them by."""
    positions = header.get("positions", False) is True
    if len(extras) != int(positions) and len(extras) != int(positions) + 1:
        raise BadRequest("bad_tensors", "after the hidden states: a mask?, then position ids?")
    if positions:
        pos = extras[-1]
        if pos.dtype not in ("int32", "int64") or pos.ndim != 2:
            raise BadRequest("bad_positions", "position ids must be an int (batch, seq) tensor")
        if pos.shape[0] not in (1, batch) or pos.shape[1] != seq:
            raise BadRequest("bad_positions", f"position ids must be ({batch}, {seq})")
        values = pos.values() if pos.numel() else None
        if values is not None and not 0 <= int(values.min()) <= int(values.max()) < MAX_POSITION:
            raise BadRequest("bad_positions", f"position ids must be in [0, {MAX_POSITION})")
    has_mask = len(extras) > int(positions)
    if has_mask and (extras[0].ndim != 2 or extras[0].shape != (batch, mask_len)):
        raise BadRequest("bad_mask", f"attention mask must be ({batch}, {mask_len})")
    return {"mask": has_mask, "positions": positions}


class BlockHandlers:
    """Validates requests at the edge and hands them to the compute process. `state` is what
    the server announces: joining (loading), online, draining (no new work; exiting or moving)."""

    def __init__(
        self,
        executor: Executor,
        model: str,
        budget: CacheBudget,
        *,
        limits: Limits | None = None,
    ) -> None:
        self.executor = executor
        self.model = model
        self.budget = budget
        self.limits = limits or Limits()
        self.state = "joining"
        self.throughput = 0.0
        self.active = 0  # requests and sessions in progress (draining waits for 0)
        self.in_flight: Counter[Any] = Counter()  # forward/backward requests per peer
        # Answered forward/backward requests by batch size: observable splitting into
        # sub-batches, and what batch sizes a server actually sees.
        self.served: dict[str, Counter[int]] = {"forward": Counter(), "backward": Counter()}
        self._changed = trio.Event()

    @property
    def worker(self) -> dict[str, Any]:
        return self.executor.info

    def info(self) -> dict[str, Any]:
        w = self.worker
        return {
            "model": self.model,
            "blocks": list(self.executor.spec["blocks"]),
            "n_blocks": w["n_blocks"],
            "hidden_size": w["hidden_size"],
            "dtype": w["dtype"],
            "quant": w["quant"],
            "adapters": w.get("adapters", []),
            "state": self.state,
            "throughput": self.throughput,
            "cache_tokens_free": self.budget.free_tokens,
            "queued": self.executor.queued(),
            # Of the compute process: what serving these blocks costs. rss/peak_rss are as of
            # its last reply; baseline_rss is before it loaded any weight.
            "memory": {
                "weight_bytes": w["weight_bytes"],
                "baseline_rss": w["baseline_rss"],
                "rss": w["rss"],
                "peak_rss": w["peak_rss"],
            },
            "version": __version__,
            "codecs": list(CODECS),
            "limits": {"max_batch": self.limits.max_batch, "max_tokens": self.limits.max_tokens},
            "served": {
                op: {str(batch): n for batch, n in sorted(by_batch.items())}
                for op, by_batch in self.served.items()
            },
        }

    def register(self, host: IHost) -> None:
        host.set_stream_handler(INFO_PROTOCOL, self._on_info)
        host.set_stream_handler(FORWARD_PROTOCOL, self._on_forward)
        host.set_stream_handler(BACKWARD_PROTOCOL, self._on_backward)

    # ---- draining ---------------------------------------------------------------------------

    def begin(self) -> None:
        self.active += 1

    def end(self) -> None:
        self.active -= 1
        self._changed.set()
        self._changed = trio.Event()

    async def drain(self, timeout: float) -> bool:
        """Refuses new work from now on and waits up to `timeout` s for the work in progress.
        True if everything finished."""
        self.state = "draining"
        with trio.move_on_after(timeout):
            while self.active:
                await self._changed.wait()
        return self.active == 0

    # ---- requests ---------------------------------------------------------------------------

    async def _on_info(self, stream: INetStream) -> None:
        with trio.move_on_after(self.limits.request_timeout):
            try:
                await read_message(stream, max_tensor_bytes=0, frames=True)
                await write_message(stream, self.info())
                await stream.close()
            except Exception as e:  # a broken stream from a peer must not take us down
                log.debug("info request failed: %s", e)
                await reset_stream(stream)

    def check_blocks(self, header: dict[str, Any]) -> tuple[int, int]:
        span_start, span_end = self.executor.spec["blocks"]
        start, end = header.get("start", span_start), header.get("end", span_end)
        ints = type(start) is int and type(end) is int
        if not ints or not span_start <= start < end <= span_end:
            served = f"{span_start}:{span_end}"
            raise BadRequest("bad_blocks", f"blocks {start}:{end} are not within served {served}")
        return start, end

    def check_hidden(self, hidden: Frame) -> tuple[int, int]:
        size = self.worker["hidden_size"]
        if hidden.ndim != 3 or hidden.shape[-1] != size or 0 in hidden.shape:
            raise BadRequest("bad_shape", f"hidden states must be (batch, seq, {size})")
        if not hidden.is_float:
            raise BadRequest("bad_dtype", "hidden states must be a floating-point tensor")
        return hidden.shape[0], hidden.shape[1]

    def _check(
        self, header: dict[str, Any], tensors: list[Frame], *, backward: bool = False
    ) -> dict[str, Any]:
        """The request for the compute process (with the reply codec)."""
        start, end = self.check_blocks(header)
        tensors, tuning = check_tuning(header, tensors)
        codec = header.get("codec", "none")
        if codec not in CODECS:
            raise BadRequest("bad_codec", f"codec must be one of {CODECS}")
        required = 2 if backward else 1
        if not required <= len(tensors) <= required + 2:
            what = "hidden states, output gradient" if backward else "hidden states"
            raise BadRequest("bad_tensors", f"send {what}, then a mask?, then position ids?")
        batch, seq = self.check_hidden(tensors[0])
        if not 0 < batch <= self.limits.max_batch or not 0 < batch * seq <= self.limits.max_tokens:
            raise BadRequest(
                "too_large",
                f"batch {batch} x seq {seq} is over the limits (batch <= {self.limits.max_batch}, "
                f"tokens <= {self.limits.max_tokens})",
            )
        if backward and (tensors[1].shape != tensors[0].shape or not tensors[1].is_float):
            raise BadRequest("bad_grad", "the output gradient must have the hidden states' shape")
        flags = check_extras(header, tensors[required:], batch, seq, seq)
        all_hidden = header.get("all_hidden", False)
        if all_hidden not in (True, False) or (all_hidden and backward):
            raise BadRequest("bad_request", "all_hidden is a boolean, for forward only")
        op = "backward" if backward else "forward"
        request = {"op": op, "start": start, "end": end, "all_hidden": all_hidden}
        # The compute process frames its answer with the client's codec; we pass it on as is.
        return request | flags | tuning | {"codec": codec}

    async def _on_forward(self, stream: INetStream) -> None:
        await self._serve(stream, backward=False)

    async def _on_backward(self, stream: INetStream) -> None:
        await self._serve(stream, backward=True)

    async def _serve(self, stream: INetStream, *, backward: bool) -> None:
        """One request: read and validate, compute in the compute process, answer; errors are
        replies."""
        peer = stream.muxed_conn.peer_id
        self.begin()
        self.in_flight[peer] += 1
        try:
            with trio.move_on_after(self.limits.request_timeout):
                if self.in_flight[peer] > self.limits.max_requests_per_peer:
                    await refuse(stream, "too_many_requests", "wait for your other requests")
                else:
                    await self._serve_one(stream, backward=backward)
        finally:
            self.in_flight[peer] -= 1
            if not self.in_flight[peer]:
                del self.in_flight[peer]
            self.end()

    async def _serve_one(self, stream: INetStream, *, backward: bool) -> None:
        try:
            header, tensors = await read_message(stream, frames=True)
            try:
                if self.state != "online":
                    raise BadRequest(self.state, f"the server is {self.state}; use another")
                request = self._check(header, tensors, backward=backward)
            except BadRequest as e:
                await write_message(stream, {"error": e.code, "message": str(e)})
                await stream.close()
                return
            reply, out = await self.executor.call(request, tensors, priority=TRAINING)
            if "error" in reply:
                await write_message(stream, reply)
            else:
                self.served[request["op"]][tensors[0].shape[0]] += 1
                answer = {"ok": True} | ({"named": reply["named"]} if reply.get("named") else {})
                await write_message(stream, answer, out)
            await stream.close()
        except (MessageError, FrameError, CodecError) as e:
            with contextlib.suppress(Exception):
                await write_message(stream, {"error": "malformed", "message": str(e)})
            await reset_stream(stream)
        except Exception as e:  # never let a peer's stream crash the daemon
            log.warning("%s request failed: %s", "backward" if backward else "forward", e)
            await reset_stream(stream)


async def refuse(stream: INetStream, code: str, message: str) -> None:
    """Answers with an error without reading the request (it may be large)."""
    with contextlib.suppress(Exception):
        await write_message(stream, {"error": code, "message": message})
        await stream.close()


async def reset_stream(stream: INetStream) -> None:
    with contextlib.suppress(Exception):  # already closed or reset by the peer
        await stream.reset()
