"""The bridge from `petald api`'s requests to the distributed model: `Engine` turns validated
requests into prompt tokens (the model's chat template), runs each answer in its own inference
session (its own KV cache on the servers, never shared) and hands the text out piece by piece
through a trio memory channel. Entry point: `await nursery.start(engine.run)`, then
`stream = await engine.submit(...)` and `async for item in stream` (`Piece`s, then one `Finished`;
a failure raises `ApiError`).

Threads: the model is synchronous (its client runs its own trio loop in a thread, and `forward`
blocks on it), so each answer's decoding loop runs in a worker thread (`trio.to_thread`), at most
`max_concurrent` at once; requests beyond wait their turn, at most `max_queue` of them, and past
that get 429. One step (one forward through the swarm) runs at a time on the model — its forward
is not reentrant (`petald.models.remote_layers`) — so concurrent answers interleave step by step,
each in its own session. Sampling is ours (temperature, top-p, a `torch.Generator` per request so
that `seed` is per request, not process-wide): greedy is the argmax, exactly what generate()
does. An answer whose client went away stops at its next step."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import outcome
import torch
import trio

from petald.api.schema import ApiError, Decoding, Message, Sampling
from petald.api.text import Detokenizer, StopText
from petald.errors import PetaldError

log = logging.getLogger(__name__)
CHANNEL_ITEMS = 64  # pieces an answer may run ahead of a slow HTTP client before it waits


@dataclass(frozen=True)
class EngineConfig:
    max_concurrent: int = 4  # answers generated at once (each holds a session on the servers)
    max_queue: int = 32  # answers waiting for a turn; more get 429
    max_length: int = 4096  # tokens of one session: prompt + answer

    def __post_init__(self) -> None:
        if self.max_concurrent < 1 or self.max_queue < 0:
            raise ValueError("--max-concurrent must be >= 1 and --max-queue >= 0")
        if self.max_length < 2:
            raise ValueError("--max-length must be at least 2 tokens")


@dataclass(frozen=True)
class Piece:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (end of text or a stop sequence) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Job:
    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]
    cancelled: threading.Event = field(default_factory=threading.Event)


class _Cancelled(Exception):
    """The answer's client went away, or the server stops: the loop ends at the next step."""


class Stream:
    """One answer's items; `close()` (also on leaving `async with`) stops its generation."""

    def __init__(self, receive: trio.MemoryReceiveChannel[Any], job: _Job) -> None:
        self._receive = receive
        self._job = job

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Piece | Finished:
        """The next item; ApiError if the answer failed. A plain iterator, not an async
        generator: one left half-read needs no finalizing by the garbage collector."""
        try:
            item = await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
        if isinstance(item, ApiError):
            raise item
        return item

    def close(self) -> None:
        self._job.cancelled.set()
        self._receive.close()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class Engine:
    def __init__(self, model: Any, tokenizer: Any, config: EngineConfig) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.model_name: str = model.transformer_blocks.model
        self._tokenizer_lock = threading.Lock()
        self._step_lock = threading.Lock()  # the model's forward is not reentrant
        self._slots = trio.Semaphore(config.max_concurrent)
        self._threads = trio.CapacityLimiter(config.max_concurrent + 1)  # + one tokenizing
        self._admitted = 0  # running or waiting for a slot
        self._nursery: trio.Nursery | None = None
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos = frozenset(eos)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Owns the answers' tasks; cancelling it stops every answer at its next step."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # ---- prompts ---------------------------------------------------------------------------

    async def chat_prompt(self, messages: tuple[Message, ...]) -> list[int]:
        turns = [{"role": m.role, "content": m.content} for m in messages]

        def render() -> list[int]:
            with self._tokenizer_lock:
                out = self.tokenizer.apply_chat_template(
                    turns, add_generation_prompt=True, tokenize=True, return_dict=True
                )
            return list(out["input_ids"])

        try:
            return await trio.to_thread.run_sync(render, limiter=self._threads)
        except Exception as e:  # the template refused the conversation (e.g. role order)
            raise ApiError(
                400, f"the chat template refused the messages: {e}", param="messages"
            ) from None

    async def text_prompt(self, text: str) -> list[int]:
        def encode() -> list[int]:
            with self._tokenizer_lock:
                return list(self.tokenizer(text)["input_ids"])

        return await trio.to_thread.run_sync(encode, limiter=self._threads)

    def budget(self, prompt: list[int], decoding: Decoding, param: str) -> int:
        """max_tokens for this prompt: as asked, or (when not given) what fits in a session."""
        room = self.config.max_length - len(prompt)
        if not prompt:
            raise ApiError(400, f"the {param} is empty", param=param, code="invalid_value")
        if room < 1 or (not decoding.fit and decoding.max_tokens > room):
            raise ApiError(
                400,
                f"This model's maximum context length is {self.config.max_length} tokens "
                f"(petald api --max-length); the {param} has {len(prompt)} and max_tokens "
                f"asks for {decoding.max_tokens} more",
                param=param,
                code="context_length_exceeded",
            )
        return min(decoding.max_tokens, room)

    # ---- answers ---------------------------------------------------------------------------

    def submit(self, prompt: list[int], max_tokens: int, decoding: Decoding) -> Stream:
        """Starts the answer (or queues it); raises ApiError 429 when the queue is full."""
        if self._nursery is None:
            raise ApiError(503, "the server is starting or stopping", type="server_error")
        if self._admitted >= self.config.max_concurrent + self.config.max_queue:
            raise ApiError(
                429,
                f"{self._admitted} requests are running or queued (petald api --max-concurrent "
                "and --max-queue): retry later",
                type="rate_limit_error",
                code="rate_limit_exceeded",
            )
        job = _Job(prompt, max_tokens, decoding.sampling, decoding.stop)
        send, receive = trio.open_memory_channel[Any](CHANNEL_ITEMS)
        self._admitted += 1
        self._nursery.start_soon(self._answer, job, send)
        return Stream(receive, job)

    async def _answer(self, job: _Job, send: trio.MemorySendChannel[Any]) -> None:
        async with send:
            try:
                async with self._slots:
                    if not job.cancelled.is_set():  # its client may have left while it waited
                        await send.send(await self._in_thread(job, send))
            except (_Cancelled, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            except PetaldError as e:  # no route, servers gone: the swarm cannot serve now
                log.warning("an answer failed: %s", e)
                error = ApiError(503, f"the swarm could not serve this request: {e}",
                                 type="server_error", code="swarm_unavailable")  # fmt: skip
                await _send_quietly(send, error)
            except Exception as e:
                log.exception("an answer failed")
                error = ApiError(500, f"internal error: {e!r}", type="server_error")
                await _send_quietly(send, error)
            finally:
                self._admitted -= 1

    async def _in_thread(self, job: _Job, send: trio.MemorySendChannel[Any]) -> Finished:
        """`_decode` in a worker thread, which trio waits for even when cancelled: a sibling
        task flags the job then, so the thread ends at its next step."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_exit, job)
            result = await outcome.acapture(
                trio.to_thread.run_sync, self._decode, job, _emitter(send), limiter=self._threads
            )
            nursery.cancel_scope.cancel()
        return result.unwrap()  # outside the nursery: its error is not wrapped in a group

    def _decode(self, job: _Job, emit: Callable[[Piece], None]) -> Finished:
        """The decoding loop, in a worker thread: prefill, then one step per token."""
        model = self.model
        seed = job.sampling.seed
        rng = torch.Generator().manual_seed(
            int.from_bytes(os.urandom(8), "little") if seed is None else seed
        )
        detok = Detokenizer(self.tokenizer, self._tokenizer_lock)
        text = StopText(job.stop)
        tokens = torch.tensor([job.prompt], dtype=torch.long)  # (1, seq)
        n, reason = 0, "length"
        length = len(job.prompt) + job.max_tokens
        with model.inference_session(max_length=length) as session, torch.no_grad():
            while n < job.max_tokens:
                if job.cancelled.is_set():
                    raise _Cancelled
                with self._step_lock:
                    out = model(input_ids=tokens, past_key_values=session, logits_to_keep=1)
                token = sample(out.logits[0, -1], job.sampling, rng)
                n += 1
                if token in self.eos:
                    reason = "stop"
                    break
                if piece := text.feed(detok.add(token)):
                    emit(Piece(piece))
                if text.stopped:
                    reason = "stop"
                    break
                tokens = torch.tensor([[token]], dtype=torch.long)
        if piece := text.feed(detok.flush()) + text.finish():
            emit(Piece(piece))
        return Finished(reason, len(job.prompt), n)


def sample(logits: torch.Tensor, sampling: Sampling, rng: torch.Generator) -> int:
    """The next token from (vocab,) logits: the argmax at temperature 0 (or top_p 0), else
    a draw from the temperature-scaled distribution cut to its top-p nucleus."""
    if sampling.temperature == 0 or sampling.top_p == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        ranked, order = probs.sort(descending=True)
        keep = ranked.cumsum(0) - ranked < sampling.top_p  # the top token is always kept
        probs = torch.zeros_like(probs).scatter_(0, order[keep], ranked[keep])
    return int(torch.multinomial(probs, 1, generator=rng))


def _emitter(send: trio.MemorySendChannel[Any]) -> Callable[[Piece], None]:
    """From the worker thread: hands a piece to the answer's channel (waiting while it is
    full); raises when the HTTP side closed it, which ends the loop."""

    def emit(piece: Piece) -> None:
        try:
            trio.from_thread.run(send.send, piece)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.RunFinishedError):
            raise _Cancelled from None

    return emit


async def _cancel_on_exit(job: _Job) -> None:
    """Flags the job when its task is cancelled (the server stops): the worker thread, which
    trio waits for, then ends at its next step."""
    try:
        await trio.sleep_forever()
    finally:
        job.cancelled.set()


async def _send_quietly(send: trio.MemorySendChannel[Any], item: Any) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await send.send(item)  # unless the client left: then nobody is told
