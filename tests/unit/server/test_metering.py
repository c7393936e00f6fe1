"""Request metering at the stream edge (petald.server.metering): the kind and result of each
reply read back from the bytes `write_message` writes, inference sessions counted open and
closed, latency observed per reply; and the exposition of a per-process registry."""

from __future__ import annotations

from typing import Any

import torch
import trio

from petald.metrics import Metrics
from petald.server.metering import MeteredHost, reply_header, result_of
from petald.web.http import HttpAddress
from petald.wire.messages import write_message
from petald.wire.protocols import FORWARD_PROTOCOL, INFERENCE_PROTOCOL, PUSH_PROTOCOL


class Captured:
    """A stream that records what is written and hands out scripted reads."""

    def __init__(self, reads: list[bytes]) -> None:
        self.writes: list[bytes] = []
        self.reads = reads

    async def write(self, data: bytes) -> None:
        self.writes.append(data)

    async def read(self, n: int | None = None) -> bytes:
        return self.reads.pop(0) if self.reads else b""


class Host:
    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}

    def set_stream_handler(self, protocol: str, handler: Any) -> None:
        self.handlers[protocol] = handler


def sample(m: Metrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


async def test_reply_headers_are_read_back_from_written_messages() -> None:
    """Catches: a header parsed from the wrong offset (tensors after it, long varints)."""
    s = Captured([])
    await write_message(s, {"ok": True, "step": 3}, [torch.zeros(2, 3)])
    await write_message(s, {"error": "busy", "message": "x" * 300})
    assert reply_header(s.writes[0]) == {"ok": True, "step": 3, "tensors": 1}
    assert result_of(reply_header(s.writes[1]) or {}) == "busy"
    assert reply_header(b"\x05ab") is None and reply_header(b"") is None
    assert reply_header(b"\xff\xff\xff\xff\x01") is None
    assert result_of({"error": "<script>"}) == "other"  # label values stay bounded


async def test_an_inference_stream_counts_its_open_steps_pushes_and_session() -> None:
    """Catches: steps counted as opens (or not at all), a session gauge that never goes back
    down, pushes not counted from the step replies, refusals through the wrapper lost."""
    m = Metrics(HttpAddress("127.0.0.1", 0))
    host = Host()
    metered = MeteredHost(host, m)  # type: ignore[arg-type]
    during: list[float] = []

    async def session(stream: Any) -> None:
        for reply in (
            {"ok": True, "session": b"t"},
            {"ok": True, "step": 0},
            {"ok": True, "step": 1, "pushed": True},
            {"error": "bad_position"},
            {"ok": True, "step": 2, "pushed": False},
        ):
            await stream.read()
            await write_message(stream, reply)
        during.append(sample(m, "petald_inference_sessions_open"))

    async def forward(stream: Any) -> None:
        await stream.read()
        await write_message(stream, {"error": "bad_blocks"})

    metered.set_stream_handler(INFERENCE_PROTOCOL, session)
    metered.set_stream_handler(FORWARD_PROTOCOL, forward)
    metered.set_stream_handler(PUSH_PROTOCOL, forward)
    assert host.handlers[PUSH_PROTOCOL] is forward  # pushes pass through unwrapped
    await host.handlers[INFERENCE_PROTOCOL](Captured([b"x"] * 5))
    await host.handlers[FORWARD_PROTOCOL](Captured([b"x"]))
    assert during == [1.0]
    assert sample(m, "petald_inference_sessions_open") == 0
    total = "petald_requests_total"
    assert sample(m, total, kind="inference_open", result="ok") == 1
    assert sample(m, total, kind="inference_step", result="ok") == 3
    assert sample(m, total, kind="inference_step", result="bad_position") == 1
    assert sample(m, total, kind="push", result="ok") == 1
    assert sample(m, total, kind="push", result="failed") == 1
    assert sample(m, total, kind="forward", result="bad_blocks") == 1
    timed = "petald_request_duration_seconds_count"
    assert sample(m, timed, kind="inference_step") == 4


async def test_metrics_are_served_per_process_registry() -> None:
    """Catches: a shared global registry (a second Metrics would clash or double count), an
    endpoint that does not answer in the trio loop."""
    a, b = Metrics(HttpAddress("127.0.0.1", 0)), Metrics(HttpAddress("127.0.0.1", 0))
    a.requests.labels("info", "ok").inc()
    assert sample(b, "petald_requests_total", kind="info", result="ok") == 0
    async with trio.open_nursery() as nursery:
        url = await nursery.start(a.serve)
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        body = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some():
                body += chunk
        nursery.cancel_scope.cancel()
    assert body.startswith(b"HTTP/1.1 200")
    assert b'petald_requests_total{kind="info",result="ok"} 1.0' in body
