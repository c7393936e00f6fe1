"""Request metrics of a block server, taken at the edge where streams meet the handlers:
`MeteredHost(host, metrics)` is `host`, except that the block RPC handlers registered through it
(info, forward, backward, inference) get their streams wrapped, and each reply the handler writes
is counted by kind and result from its header, timed from the request's first byte.

Why here and not inside the handlers: the handlers and the inference sessions change (batching,
new ops) while the wire does not; every reply is one `write_message` call, i.e. one
`stream.write` of a varint-prefixed CBOR header followed by its frames. Reading that header back
(a few dozen bytes, not the tensors) gives the kind and the result without touching them:

- info, forward, backward: one reply per stream; `{"error": code}` or the answer (`ok`);
- inference: the first reply opens the session (`inference_open`: `{"ok", "session"}` or an
  error such as `busy`), each later one answers a step (`inference_step`); a step reply that
  says `"pushed"` also counts a push of its output to the next server (`push`: ok/failed).
Sessions count as open from their `ok` open reply until their stream handler returns.

Latency: from the first read after the previous reply to the reply (one request in flight per
stream, as clients send them; a step read ahead of the previous reply is counted but not timed).

Entry point: `MeteredHost(host, metrics)`, given to the handlers' `register` (inside an
`AllowListHost`, so refusals are counted as `not_allowed`)."""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import cbor2
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol

from petald.metrics import Metrics
from petald.wire.protocols import (
    BACKWARD_PROTOCOL,
    FORWARD_PROTOCOL,
    INFERENCE_PROTOCOL,
    INFO_PROTOCOL,
)

KINDS = {
    INFO_PROTOCOL: "info",
    FORWARD_PROTOCOL: "forward",
    BACKWARD_PROTOCOL: "backward",
    INFERENCE_PROTOCOL: "inference",
}
# Error codes are ours, but bound the label values anyway: anything else counts as "other".
_CODE = re.compile(r"[a-z][a-z0-9_]{0,31}")
# A reply header is a small CBOR map; read back at most this much of it.
MAX_HEADER_PEEK = 4096


def reply_header(data: bytes) -> dict[str, Any] | None:
    """The CBOR header at the start of one written message, or None if `data` is not one."""
    size, shift, i = 0, 0, 0
    while i < min(len(data), 4):
        byte = data[i]
        size |= (byte & 0x7F) << shift
        shift, i = shift + 7, i + 1
        if not byte & 0x80:
            break
    else:
        return None
    if not 0 < size <= MAX_HEADER_PEEK or i + size > len(data):
        return None
    try:
        header = cbor2.loads(data[i : i + size])
    except Exception:  # not a message start: count the bytes, not a request
        return None
    return header if isinstance(header, dict) else None


def result_of(header: dict[str, Any]) -> str:
    if "error" not in header:
        return "ok"
    code = header["error"]
    return code if isinstance(code, str) and _CODE.fullmatch(code) else "other"


class MeteredStream:
    """`stream` with its replies counted (see the module docstring)."""

    def __init__(self, stream: INetStream, kind: str, metrics: Metrics) -> None:
        self._stream = stream
        self._kind = kind
        self._metrics = metrics
        self._t0: float | None = None
        self._opened = False

    def __getattr__(self, name: str) -> Any:  # muxed_conn, close, reset, ...
        return getattr(self.__dict__["_stream"], name)

    async def read(self, n: int | None = None) -> bytes:
        data: bytes = await self._stream.read(n)
        if data and self._t0 is None:
            self._t0 = time.perf_counter()
        return data

    async def write(self, data: bytes) -> None:
        # Counted before it goes out: a client that reads the answer and then scrapes the
        # metrics must find it counted.
        header = reply_header(data)
        if header is not None:
            self._count(header)
        await self._stream.write(data)

    def _count(self, header: dict[str, Any]) -> None:
        m, kind, result = self._metrics, self._kind, result_of(header)
        if kind == "inference":
            kind = "inference_step" if self._opened else "inference_open"
            if kind == "inference_open" and result == "ok":
                self._opened = True
                m.sessions.inc()
            if "pushed" in header:
                m.requests.labels("push", "ok" if header["pushed"] is True else "failed").inc()
        m.requests.labels(kind, result).inc()
        if self._t0 is not None:
            m.latency.labels(kind).observe(time.perf_counter() - self._t0)
            self._t0 = None

    def finish(self) -> None:
        if self._opened:
            self._opened = False
            self._metrics.sessions.dec()


class MeteredHost:
    """`host`, metering the block RPC handlers registered through it."""

    def __init__(self, host: IHost, metrics: Metrics) -> None:
        self._host = host
        self.metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self._host, name)

    def set_stream_handler(
        self, protocol: TProtocol, handler: Callable[[INetStream], Awaitable[None]]
    ) -> None:
        kind = KINDS.get(protocol)
        if kind is None:  # pushes are counted upstream, from the step replies
            self._host.set_stream_handler(protocol, handler)
            return

        async def metered(stream: INetStream) -> None:
            wrapped = MeteredStream(stream, kind, self.metrics)
            try:
                await handler(wrapped)  # type: ignore[arg-type]
            finally:
                wrapped.finish()

        self._host.set_stream_handler(protocol, metered)
