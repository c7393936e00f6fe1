"""The HTTP side of `petald api`: a Starlette app with OpenAI's routes — GET /v1/models,
POST /v1/chat/completions and /v1/completions (streamed as server-sent events, or not) — over an
`Engine`. Owns reading bodies under a size bound, the optional API key (`Authorization: Bearer`,
compared in constant time, on /v1 routes), the OpenAI shapes of answers and chunks, and turning
every failure into OpenAI's error shape with its HTTP status (400 bad request, 401 key, 404 route
or model, 413 body, 429 queue full, 503 swarm). Entry point: `build_app(engine, config,
extra_routes=[...])`; other pages (the swarm health page) come in through `extra_routes`,
mounted as given and outside the key check."""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from petald.api.generation import Engine, Finished, Piece, Stream
from petald.api.schema import (
    MAX_BODY_BYTES,
    ApiError,
    Decoding,
    Limits,
    parse_chat,
    parse_completion,
    parse_json,
)
from petald.api.sse import EventStream, cancel_on_disconnect

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AppConfig:
    api_key: str | None = None  # None: no key asked (fine on 127.0.0.1, the default)
    max_tokens: int = 256  # the most a request may ask for, and the chat default


def build_app(
    engine: Engine, config: AppConfig, *, extra_routes: Sequence[BaseRoute] = ()
) -> ASGIApp:
    limits = Limits(
        models=frozenset({engine.model_name}),
        max_tokens=config.max_tokens,
        vocab_size=len(engine.tokenizer),
    )
    created = int(time.time())
    card = {"id": engine.model_name, "object": "model", "created": created, "owned_by": "petald"}

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [card]})

    async def model(request: Request) -> Response:
        if request.path_params["name"] != engine.model_name:
            name = request.path_params["name"][:100]
            raise ApiError(404, f"The model {name!r} does not exist", param="model",
                           code="model_not_found")  # fmt: skip
        return JSONResponse(card)

    async def chat(request: Request) -> Response:
        req = parse_chat(await _read_json(request), limits)
        prompt = await engine.chat_prompt(req.messages)
        return await _answer(request, engine, req.decoding, prompt, "messages", _ChatShape())

    async def completions(request: Request) -> Response:
        req = parse_completion(await _read_json(request), limits)
        text = req.prompt
        prompt = list(text) if isinstance(text, tuple) else await engine.text_prompt(text)
        return await _answer(request, engine, req.decoding, prompt, "prompt", _TextShape())

    routes: list[BaseRoute] = [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", model, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        *extra_routes,
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
    )
    return _KeyCheck(app, config.api_key) if config.api_key else app


async def _answer(
    request: Request,
    engine: Engine,
    decoding: Decoding,
    prompt: list[int],
    param: str,
    shape: _Shape,
) -> Response:
    max_tokens = engine.budget(prompt, decoding, param)
    stream = engine.submit(prompt, max_tokens, decoding)
    shape.start(decoding.model)
    if not decoding.stream:
        return await _whole(request, stream, shape)
    items = aiter(stream)
    try:  # the first piece before the headers: a swarm that cannot serve is a plain 503
        first = await anext(items)
    except BaseException:
        stream.close()
        raise
    return EventStream(_chunks(shape, first, items, decoding.include_usage), stream.close)


async def _whole(request: Request, stream: Stream, shape: _Shape) -> Response:
    """The whole answer in one JSON; generation stops if the client goes away meanwhile."""
    parts: list[str] = []
    done: Finished | None = None
    error: ApiError | None = None
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_on_disconnect, request.receive, scope)
            try:
                async for item in stream:
                    if isinstance(item, Finished):
                        done = item
                        break
                    parts.append(item.text)
            except ApiError as e:  # kept out of the nursery, which would wrap it in a group
                error = e
            nursery.cancel_scope.cancel()
    stream.close()
    if error is not None:
        raise error
    if done is None:  # the client left (or the answer ended unfinished): nobody reads this
        return Response(status_code=499)
    return JSONResponse(shape.whole("".join(parts), done))


async def _chunks(
    shape: _Shape, first: Piece | Finished, items: AsyncIterator[Piece | Finished], usage: bool
) -> AsyncIterator[dict[str, Any]]:
    yield shape.opening()
    item = first
    while isinstance(item, Piece):
        yield shape.chunk(item.text, None)
        item = await anext(items)
    yield shape.chunk("", item.reason)
    if usage:
        yield {**shape.chunk("", None), "choices": [], "usage": _usage(item)}


def _usage(done: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


class _Shape:
    """The JSON of one endpoint's answers and stream chunks."""

    kind = "text_completion"
    prefix = "cmpl"

    def start(self, model: str) -> None:
        self.head = {
            "id": f"{self.prefix}-{uuid.uuid4().hex}",
            "object": self.kind,
            "created": int(time.time()),
            "model": model,
        }

    def opening(self) -> dict[str, Any]:
        return self.chunk("", None)

    def chunk(self, text: str, finish: str | None) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self.head, "choices": [choice]}

    def whole(self, text: str, done: Finished) -> dict[str, Any]:
        return {**self.chunk(text, done.reason), "usage": _usage(done)}


class _TextShape(_Shape):
    pass


class _ChatShape(_Shape):
    kind = "chat.completion"
    prefix = "chatcmpl"

    def opening(self) -> dict[str, Any]:
        return self._delta({"role": "assistant", "content": ""}, None)

    def chunk(self, text: str, finish: str | None) -> dict[str, Any]:
        return self._delta({"content": text} if text or finish is None else {}, finish)

    def _delta(self, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**self.head, "object": "chat.completion.chunk", "choices": [choice]}

    def whole(self, text: str, done: Finished) -> dict[str, Any]:
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": done.reason}
        return {**self.head, "choices": [choice], "usage": _usage(done)}


async def _read_json(request: Request) -> dict[str, Any]:
    """The body, refused past MAX_BODY_BYTES (by its Content-Length, or while it arrives)."""
    declared = request.headers.get("content-length", "")
    too_big = ApiError(
        413, f"the request body exceeds {MAX_BODY_BYTES} bytes", code="body_too_large"
    )
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_big
        chunks.append(chunk)
    return parse_json(b"".join(chunks))


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        error = ApiError(404, f"Unknown request URL: {request.method} {request.url.path}",
                         code="unknown_url")  # fmt: skip
    elif exc.status_code == 405:
        error = ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                         code="method_not_allowed")  # fmt: skip
    else:
        error = ApiError(exc.status_code, str(exc.detail))
    return JSONResponse(error.body(), status_code=error.status, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    error = ApiError(500, f"internal error: {exc!r}", type="server_error")
    return JSONResponse(error.body(), status_code=500)


class _KeyCheck:
    """Asks /v1 requests for `Authorization: Bearer KEY` (OpenAI's 401 when it is wrong)."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            # compare_digest: the time taken does not tell how much of a guess was right.
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)):
                error = ApiError(401, "Incorrect API key provided (petald api --api-key)",
                                 code="invalid_api_key")  # fmt: skip
                await JSONResponse(error.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)
