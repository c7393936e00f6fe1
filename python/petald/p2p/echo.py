"""`/petald/echo/1.0.0`: a bounded echo service and its client, for `petald ping` — measuring
round trips and checking data integrity over whatever connection the `Dialer` found (direct or
relayed). Server: `EchoService(host).serve()`; client: `await echo_round_trips(...)`.

Wire: the client sends frames `u32 big-endian length || payload`; the server sends each frame
back unchanged; a zero length ends the stream."""

from __future__ import annotations

import contextlib
import os
import time

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from petald.p2p.relay import is_relayed

PROTOCOL_ID = TProtocol("/petald/echo/1.0.0")
# Largest payload echoed: enough for a 1 MiB bulk probe, small enough to buffer per stream.
MAX_PAYLOAD = 1 << 20
# Round trips per stream, and concurrent echo streams: ping is a diagnostic, not a data pipe.
MAX_ROUND_TRIPS = 10_000
MAX_STREAMS = 8
# Seconds the server waits for the next frame (or for the rest of one) before hanging up.
FRAME_TIMEOUT = 10.0


async def read_exact(stream: INetStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.read(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


class EchoService:
    def __init__(self, host: IHost) -> None:
        self.host = host
        self._slots = trio.Semaphore(MAX_STREAMS)
        self.served = 0

    def serve(self) -> None:
        self.host.set_stream_handler(PROTOCOL_ID, self._on_stream)

    async def _on_stream(self, stream: INetStream) -> None:
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:  # busy: refuse rather than queue
            with contextlib.suppress(Exception):
                await stream.reset()
            return
        try:
            for _ in range(MAX_ROUND_TRIPS):
                with trio.fail_after(FRAME_TIMEOUT):
                    size = int.from_bytes(await read_exact(stream, 4), "big")
                    if size == 0:
                        break
                    if size > MAX_PAYLOAD:
                        raise ValueError(f"echo payload of {size} bytes")
                    payload = await read_exact(stream, size)
                    await stream.write(size.to_bytes(4, "big") + payload)
                self.served += 1
            await stream.close()
        except Exception:  # a misbehaving or vanished peer only loses its own stream
            with contextlib.suppress(Exception):
                await stream.reset()
        finally:
            self._slots.release()


def _percentile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


async def echo_round_trips(host: IHost, peer: ID, *, count: int, payload_bytes: int) -> dict:
    """`count` round trips of `payload_bytes` random bytes on one stream (the caller has
    connected already). Returns RTTs in ms, byte counts, integrity and whether it was relayed.
    Raises `ValueError` for bad sizes, `EOFError`/libp2p errors if the peer hangs up."""
    if not 1 <= payload_bytes <= MAX_PAYLOAD:
        raise ValueError(f"--payload-bytes must be between 1 and {MAX_PAYLOAD}")
    if not 1 <= count <= MAX_ROUND_TRIPS:
        raise ValueError(f"--count must be between 1 and {MAX_ROUND_TRIPS}")
    stream = await host.new_stream(peer, [PROTOCOL_ID])
    relayed = is_relayed(stream.muxed_conn)
    rtts: list[float] = []
    intact = True
    received = 0
    try:
        for _ in range(count):
            payload = os.urandom(payload_bytes)
            t0 = time.perf_counter()
            await stream.write(len(payload).to_bytes(4, "big") + payload)
            size = int.from_bytes(await read_exact(stream, 4), "big")
            back = await read_exact(stream, min(size, MAX_PAYLOAD))
            rtts.append((time.perf_counter() - t0) * 1e3)
            received += len(back)
            intact = intact and back == payload
        await stream.write((0).to_bytes(4, "big"))
        await stream.close()
    except BaseException:
        with contextlib.suppress(Exception):
            await stream.reset()
        raise
    return {
        "relayed": relayed,
        "count": len(rtts),
        "payload_bytes": payload_bytes,
        "bytes_sent": payload_bytes * len(rtts),
        "bytes_received": received,
        "intact": intact,
        "rtt_ms": [round(x, 3) for x in rtts],
        "rtt_p50_ms": round(_percentile(rtts, 50), 3),
        "rtt_p99_ms": round(_percentile(rtts, 99), 3),
        # Both directions over the whole run: a bulk figure when the payload is large.
        "throughput_mb_s": round(2 * received / 1e6 / (sum(rtts) / 1e3), 2),
    }
