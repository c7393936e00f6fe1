"""The compute process of `petald serve`: it loads the span and runs every forward, backward and
inference step, while the daemon process next to it keeps the network. Why two processes: the
transformers layers are many small Python calls that hold the GIL, and a trio loop sharing the
process with them answers a 16 KiB round trip in 4 to 22 ms instead of 1 ms (shared/notes). Here the
loop never waits for the GIL of a layer.

The daemon (petald.server.executor) starts `python -m petald.server.worker FD SPEC LIFELINE` with
one end of a socket pair as FD, a JSON spec (source, blocks, dtype, device, quant) and the read
end of a pipe that closes when the daemon dies. Messages are the
same CBOR header + tensor frames as on the network (petald.wire.messages), one request at a time:

    worker: {"ok": true, "n_blocks", "hidden_size", ...}  once loaded (or {"error": ...})
    daemon: {"op": "forward"|"backward", "start", "end", "mask", "positions", "all_hidden"?}
            + tensors
    daemon: {"op": "open", "sid", "batch", "max_length", "start", "end"}
    daemon: {"op": "step", "sid", "position", "mask", "positions", "reorder"?} + tensors
    daemon: {"op": "steps", "steps": [step headers as above], "counts": [tensors of each]}
            + their tensors, in order (continuous batching: petald.server.batched runs them as
            few forwards as it can)
    worker: {"ok": true, "forwards": [sessions per forward run], "replies": [as for "step"],
            "counts": [tensors of each]} + their tensors, each framed with its step's codec
    daemon: {"op": "close", "sid"} | {"op": "measure", "tokens"} | {"op": "memory"}

The daemon validated every request at the edge; a request the span still refuses (ValueError)
gets {"error": "bad_input"}, and the worker keeps going."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import trio

from petald.errors import MessageError
from petald.server.adapters import LoRA, check_lora, from_named, load_peft_adapter, split_named
from petald.server.batched import BatchStep, batching_exact, run_steps
from petald.server.blocks import Span, SpanCache
from petald.server.loading import load_span
from petald.server.startup import stamp
from petald.types import BlockRange
from petald.wire import trace
from petald.wire.frames import Frame
from petald.wire.messages import read_message, write_message
from petald.wire.streams import TrioByteStream
from petald.wire.tensors import pack

log = logging.getLogger(__name__)

Reply = tuple[dict[str, Any], list[torch.Tensor]]
COMPUTE_NICENESS = 5


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def rss_bytes() -> int:
    """Resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


class Compute:
    """The span and its inference caches, by session id."""

    def __init__(self, span: Span, adapters: dict[str, LoRA] | None = None) -> None:
        self.span = span
        self.caches: dict[int, SpanCache] = {}
        self.adapters = adapters or {}  # --adapters, by name
        # Whether steps of different sessions may share a forward: None until the first batch
        # (petald.server.batched.batching_exact probes it then), else why not ("" when they may).
        self.unbatchable: str | None = None

    def describe(self) -> dict[str, Any]:
        cfg = self.span.config
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        itemsize = torch.empty((), dtype=self.span.dtype).element_size()
        weights = sum(t.numel() * t.element_size() for t in self.span.state_dict().values())
        return {
            "blocks": [self.span.blocks.start, self.span.blocks.end],
            "n_blocks": int(cfg.num_hidden_layers),
            "hidden_size": int(cfg.hidden_size),
            "dtype": str(self.span.dtype).removeprefix("torch."),
            "quant": getattr(self.span, "quant", "none"),
            "device": str(self.span.device),
            "weight_bytes": weights,
            "weight_hashes": list(getattr(self.span, "weight_hashes", ())),  # server.weights
            # Keys and values of every block of the span, for one token.
            "adapters": sorted(self.adapters),
            "kv_bytes_per_token": 2 * len(self.span.blocks) * kv_heads * head_dim * itemsize,
            "rss": rss_bytes(),
            "peak_rss": peak_rss_bytes(),
            "torch": torch.__version__,  # the daemon imports no torch (throughput cache key)
            # Free accelerator memory, for the daemon's default KV-cache budget (None: CPU).
            "device_free_bytes": (
                torch.cuda.mem_get_info(self.span.device)[0]
                if self.span.device.type == "cuda"
                else None
            ),
        }

    def handle(self, header: dict[str, Any], tensors: list[torch.Tensor]) -> Reply:
        op = header.get("op")
        try:
            if op == "forward":
                return self._forward(header, tensors)
            if op == "backward":
                return self._backward(header, tensors)
            if op == "open":
                return self._open(header)
            if op == "step":
                return self._step(header, tensors)
            if op == "close":
                self.caches.pop(header["sid"], None)
                return {"ok": True}, []
            if op == "measure":
                return {"ok": True, "tokens_per_s": self.measure(header.get("tokens", 128))}, []
            if op == "memory":
                return {"ok": True, "peak_rss": peak_rss_bytes()}, []
            return {"error": "bad_op", "message": f"unknown op {op!r}"}, []
        except ValueError as e:
            return {"error": "bad_input", "message": str(e)}, []

    def _extras(self, header: dict[str, Any], tensors: list[torch.Tensor], first: int) -> tuple:
        """(mask, position_ids, named tensors) after the first `first` tensors, as flagged in
        the header; named tensors (fine-tuning) come last."""
        rest, named = split_named(header, tensors)
        rest = rest[first:]
        positions = rest.pop() if header.get("positions") else None
        mask = rest.pop() if header.get("mask") else None
        return mask, positions, named

    def _tuning(self, header: dict[str, Any], named: dict, start: int, end: int) -> tuple:
        """(prompts, lora) for blocks [start, end): the client's own, or a server adapter."""
        prompts, lora = from_named(named, header.get("lora_scale", 1.0))
        name = header.get("active_adapter")
        if name is not None:
            if lora is not None:
                raise ValueError("send LoRA tensors or name an active_adapter, not both")
            if name not in self.adapters:
                raise ValueError(
                    f"unknown adapter {name!r}; this server has {sorted(self.adapters)}"
                )
            first = self.span.blocks.start
            lora = self.adapters[name].slice(start - first, end - first)
        n = end - start
        blocks = list(self.span.layers[start - self.span.blocks.start :][:n])
        if lora is not None and name is None:
            check_lora(lora, blocks)
        if prompts is not None and (
            prompts.dim() != 4
            or prompts.shape[0] != n
            or prompts.shape[-1] != self.span.config.hidden_size
            or not prompts.dtype.is_floating_point
        ):
            raise ValueError(
                f"prompts must be a float (blocks={n}, batch|1, length, hidden) tensor"
            )
        return prompts, lora

    def _forward(self, header: dict[str, Any], tensors: list[torch.Tensor]) -> Reply:
        mask, positions, named = self._extras(header, tensors, 1)
        prompts, lora = self._tuning(header, named, header["start"], header["end"])
        hidden = tensors[0]
        with torch.inference_mode():
            out = self.span.forward(
                hidden,
                start_block=header["start"],
                end_block=header["end"],
                attention_mask=mask,
                position_ids=positions,
                all_hidden=bool(header.get("all_hidden")),
                prompts=prompts,
                lora=lora,
            )
        return {"ok": True}, [out.to(hidden.dtype).cpu()]

    def _backward(self, header: dict[str, Any], tensors: list[torch.Tensor]) -> Reply:
        """Input gradients, and the gradients of the client's prompts and LoRA tensors (in the
        order they were named); a server adapter stays frozen like the blocks."""
        mask, positions, named = self._extras(header, tensors, 2)
        hidden, grad = tensors[0], tensors[1]
        trainable = {k: v.detach().requires_grad_(True) for k, v in named.items()}
        prompts, lora = self._tuning(header, trainable, header["start"], header["end"])
        x = hidden.to(self.span.dtype).detach().requires_grad_(True)
        with torch.enable_grad():
            out = self.span.forward(
                x,
                start_block=header["start"],
                end_block=header["end"],
                attention_mask=mask,
                position_ids=positions,
                prompts=prompts,
                lora=lora,
            )
            inputs = [x, *trainable.values()]
            grads = torch.autograd.grad(out, inputs, grad.to(out.dtype), allow_unused=True)
        result = [
            (g if g is not None else torch.zeros_like(t)).to(t.dtype).cpu()
            for g, t in zip(grads, [hidden, *named.values()], strict=True)
        ]
        return {"ok": True, "named": list(named)}, result

    def _open(self, header: dict[str, Any]) -> Reply:
        cache = self.span.new_cache(
            header["batch"],
            header["max_length"],
            start_block=header["start"],
            end_block=header["end"],
        )
        self.caches[header["sid"]] = cache
        return {"ok": True}, []

    def _step(self, header: dict[str, Any], tensors: list[torch.Tensor]) -> Reply:
        item = self._prepare(header, tensors)
        out = self.span.run_step(item.step, item.prompts, item.lora)
        return self._step_reply(item, out)

    def _prepare(self, header: dict[str, Any], tensors: list[torch.Tensor]) -> BatchStep:
        """A step checked alone (ValueError if bad, its cache untouched but for a reorder) and
        its cache rolled back to its position."""
        cache = self.caches.get(header["sid"])
        if cache is None:
            raise ValueError("unknown session")
        mask, positions, named = self._extras(header, tensors, 1)
        prompts, lora = self._tuning(header, named, cache.blocks.start, cache.blocks.end)
        if header.get("reorder") is not None:
            cache.reorder(torch.tensor(header["reorder"], dtype=torch.long))
        step = self.span.prepare_step(tensors[0], cache, header["position"], mask, positions)
        return BatchStep(step, prompts, lora, out_dtype=tensors[0].dtype)

    @staticmethod
    def _step_reply(item: BatchStep, out: torch.Tensor) -> Reply:
        position = item.step.cache.position
        return {"ok": True, "position": position}, [out.to(item.out_dtype).cpu()]

    def steps(self, requests: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> tuple:
        """Steps of several sessions, batched where they can be (petald.server.batched): (the
        replies, in order, each as `handle` would give it; sessions per forward run)."""
        replies: list[Reply | None] = [None] * len(requests)
        prepared: list[tuple[int, BatchStep]] = []
        for i, (header, tensors) in enumerate(requests):
            if header.get("op") != "step":
                replies[i] = {"error": "bad_op", "message": "a batch holds steps only"}, []
                continue
            try:  # each alone first: a bad step is refused here and never joins the batch
                prepared.append((i, self._prepare(header, tensors)))
            except ValueError as e:
                replies[i] = {"error": "bad_input", "message": str(e)}, []
        if len(prepared) > 1 and self.unbatchable is None:
            self.unbatchable = batching_exact(self.span) or ""
            if self.unbatchable:
                log.warning("steps of different sessions run alone: %s", self.unbatchable)
        items = [item for _, item in prepared]
        outs, forwards = run_steps(self.span, items, batching=not self.unbatchable)
        for (i, item), out in zip(prepared, outs, strict=True):
            if isinstance(out, ValueError):
                replies[i] = {"error": "bad_input", "message": str(out)}, []
            else:
                replies[i] = self._step_reply(item, out)
        return [r for r in replies if r is not None], forwards

    def measure(self, tokens: int, repeats: int = 3) -> float:
        """Tokens/s of a forward of `tokens` tokens through the whole span: best of `repeats`
        after a warm-up, so a cold start (allocations, kernel choice) does not count."""
        tokens = max(1, min(int(tokens), 4096))
        x = torch.randn(1, tokens, self.span.config.hidden_size)
        best = float("inf")
        with torch.inference_mode():
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                self.span.forward(x)
                if self.span.device.type == "cuda":
                    torch.cuda.synchronize(self.span.device)
                best = min(best, time.perf_counter() - t0)
        return tokens / best


def _die_with_parent(lifeline: int) -> None:
    """Exits as soon as the daemon is gone, even killed by SIGKILL mid-load: the daemon holds
    the write end of the `lifeline` pipe, and its end of file wakes this thread. (Not
    PR_SET_PDEATHSIG: it fires when the spawning *thread* exits, and trio spawns from worker
    threads that come and go.)"""

    def watch() -> None:
        while os.read(lifeline, 1):
            pass
        os._exit(0)

    threading.Thread(target=watch, name="lifeline", daemon=True).start()


async def serve(sock: socket.socket, spec: dict[str, Any]) -> None:
    stream = TrioByteStream(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))
    baseline = rss_bytes()  # python, torch and transformers, before any weight
    try:
        span = load_span(
            spec["source"],
            BlockRange(*spec["blocks"]),
            dtype=spec.get("dtype", "auto"),
            device=spec.get("device", "cpu"),
            quant=spec.get("quant", "none"),
            progress=spec.get("progress", True),
        )
    except Exception as e:  # the daemon prints it and exits with a clear message
        await write_message(stream, {"error": type(e).__name__, "message": str(e)})
        return
    try:
        adapters = {
            Path(p).name: load_peft_adapter(Path(p), range(*spec["blocks"]), list(span.layers))
            for p in spec.get("adapters", [])
        }
    except (OSError, ValueError, KeyError) as e:
        await write_message(stream, {"error": "AdapterError", "message": str(e)})
        return
    stamp("worker.loaded")
    # Below the daemon beside us from now on: when both want the CPU, the network (DHT, gossip,
    # `info`, the next request) goes first; the compute loses little, as the daemon is mostly
    # idle. Not while loading: then the span is what the server waits for.
    with contextlib.suppress(OSError):
        os.nice(COMPUTE_NICENESS)
    compute = Compute(span, adapters)
    await write_message(stream, {"ok": True, "baseline_rss": baseline, **compute.describe()})
    while True:
        arrived: list[int] = []  # petald.wire.trace: when the header was in
        try:
            header, tensors = await read_message(stream, stamps=arrived)
        except MessageError:  # the daemon closed its end: we are done
            return
        if header.get("op") == "steps":
            await _serve_steps(stream, compute, header, tensors, arrived)
            continue
        if header.get("trace") is True:
            arrived.append(trace.now())
            reply, out = compute.handle(header, tensors)
            reply["trace"] = [*arrived, trace.now()]
        else:
            reply, out = compute.handle(header, tensors)
        # Memory rides on every reply (a /proc read), so `info` shows it without a request
        # that would queue behind a long prefill.
        reply = {**reply, "rss": rss_bytes(), "peak_rss": peak_rss_bytes()}
        if "trace" in reply:
            reply["trace"].append(trace.now())
        # Framed with the client's codec (the daemon checked it): it passes the frames on.
        await write_message(stream, reply, out, codec=header.get("codec", "none"))


async def _serve_steps(
    stream: TrioByteStream, compute: Compute, header: dict[str, Any], tensors: list, arrived: list
) -> None:
    """A "steps" request: one message in, one out (its replies' frames in order)."""
    steps, counts = header.get("steps"), header.get("counts")
    if not (isinstance(steps, list) and isinstance(counts, list) and len(steps) == len(counts)):
        raise MessageError("a steps request lists its steps and their tensor counts")
    if sum(counts) != len(tensors):  # the daemon never sends this
        raise MessageError("a steps request's counts do not match its tensors")
    requests, first = [], 0
    for step, n in zip(steps, counts, strict=True):
        requests.append((step, tensors[first : first + n]))
        first += n
    arrived.append(trace.now())
    replies, forwards = compute.steps(requests)
    done = trace.now()
    frames: list[Frame] = []
    for step, (reply, out) in zip(steps, replies, strict=True):
        if step.get("trace") is True:
            reply["trace"] = [*arrived, done, trace.now()]
        codec = step.get("codec", "none")
        frames += [Frame(pack(t, codec), str(t.dtype), tuple(t.shape)) for t in out]
    summary = {
        "ok": True,
        "forwards": forwards,
        "replies": [reply for reply, _ in replies],
        "counts": [len(out) for _, out in replies],
        "rss": rss_bytes(),
        "peak_rss": peak_rss_bytes(),
    }
    await write_message(stream, summary, frames)


def main(argv: list[str]) -> int:
    stamp("worker.imported")
    _die_with_parent(int(argv[2]))
    # Ctrl-C in a terminal reaches the whole process group: the daemon decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s worker %(message)s")
    fd, spec = int(argv[0]), json.loads(argv[1])
    trio.run(serve, socket.socket(fileno=fd), spec)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
