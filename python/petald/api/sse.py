"""Server-sent events as OpenAI streams them: one `data: {json}` event per chunk, then
`data: [DONE]`; a failure after the stream began is one `data: {"error": {...}}` event (what the
official clients raise from). `EventStream` is the ASGI response that sends them and owns the
answer's end: it watches for the HTTP client going away, and whichever way the stream ends it
calls `on_close` (which stops the answer's generation) — deterministically, not when an
abandoned async generator happens to be collected."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from petald.api.schema import ApiError

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # reverse proxies (nginx) must not buffer the stream
]


def event(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


class EventStream(Response):
    def __init__(self, events: AsyncIterator[dict[str, Any]], on_close: Callable[[], None]) -> None:
        super().__init__(status_code=200)
        self.events = events
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_on_disconnect, receive, nursery.cancel_scope)
                await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
                try:
                    async for data in self.events:
                        await _body(send, event(data))
                    await _body(send, event("[DONE]"))
                except ApiError as e:  # the answer failed mid-way: say so in the stream
                    await _body(send, event(e.body()))
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                nursery.cancel_scope.cancel()
        finally:
            self.on_close()
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                with trio.CancelScope(shield=True):
                    await aclose()


async def _body(send: Send, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    """The request's body has been read: the next message is the client's disconnect."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return
