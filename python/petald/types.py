"""Shared vocabulary: `BlockRange` and `ServerInfo`, the announcement every server publishes
(by gossip and in the DHT). `ServerInfo.from_cbor` is the one place a peer's announcement is
parsed and validated; everything after it handles typed, bounded values."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import cbor2

from petald.errors import WireError

ServerState = Literal["joining", "online", "draining"]
SERVER_STATES: tuple[ServerState, ...] = ("joining", "online", "draining")

# Bounds on what a peer may announce: no real model has more blocks, names longer than a Hub id
# or more adapters; anything beyond is hostile or broken and is refused, not truncated.
MAX_BLOCKS = 10_000
MAX_NAME = 256
MAX_ADAPTERS = 64
MAX_ADDRS = 16
MAX_ANNOUNCEMENT_BYTES = 16 * 1024
# Weight hashes (petald.server.weights): one digest per served block. 16-byte BLAKE2b digests
# for up to 256 blocks take ~4.6 KiB of the 16 KiB announcement; no real model is deeper (the
# largest have ~130 layers), and a longer span announces none (treated as an older server's).
WEIGHT_HASH_BYTES = 16
MAX_WEIGHT_HASHES = 256


class AnnouncementError(WireError, ValueError):
    """A server announcement that does not parse or validate."""


@dataclass(frozen=True, order=True)
class BlockRange:
    """Blocks [start, end) of a model."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not (0 <= self.start < self.end <= MAX_BLOCKS):
            raise ValueError(f"bad block range {self.start}:{self.end}; need 0 <= start < end")

    @classmethod
    def parse(cls, text: str) -> BlockRange:
        """`"20:40"` -> BlockRange(20, 40)."""
        try:
            a, b = text.split(":")
            return cls(int(a), int(b))
        except ValueError as e:
            raise ValueError(f"--blocks {text!r}: expected START:END, e.g. 20:40 ({e})") from None

    def __len__(self) -> int:
        return self.end - self.start

    def __contains__(self, block: object) -> bool:
        return isinstance(block, int) and self.start <= block < self.end

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"


@dataclass(frozen=True)
class ServerInfo:
    model: str
    blocks: BlockRange
    n_blocks: int = 0  # blocks in the whole model (0: not said), so views can show gaps
    state: ServerState = "joining"
    throughput: float = 0.0  # tokens/s through the whole span, measured at start
    cache_tokens_free: int = 0
    dtype: str = "float32"
    quant: str = "none"
    adapters: tuple[str, ...] = ()
    relayed: bool = False
    public_name: str = ""
    addrs: tuple[str, ...] = ()
    version: str = ""
    # BLAKE2b-128 of each served block's weights as loaded, before quantization (one per block
    # of `blocks`, in order; empty: not announced, e.g. an older server). A server's claim, not
    # a proof: see petald.client.verify for what a client makes of it.
    weight_hashes: tuple[bytes, ...] = ()

    def to_cbor(self) -> bytes:
        d = asdict(self)
        d["blocks"] = [self.blocks.start, self.blocks.end]
        d["adapters"] = list(self.adapters)
        d["addrs"] = list(self.addrs)
        d["weight_hashes"] = list(self.weight_hashes)
        return cbor2.dumps(d, canonical=True)

    @classmethod
    def from_cbor(cls, data: bytes) -> ServerInfo:
        if len(data) > MAX_ANNOUNCEMENT_BYTES:
            raise AnnouncementError(f"announcement of {len(data)} bytes is over the limit")
        try:
            d = cbor2.loads(data)
        except Exception as e:  # cbor2 raises several types on garbage
            raise AnnouncementError(f"announcement is not CBOR: {e}") from None
        if not isinstance(d, dict):
            raise AnnouncementError("announcement is not a CBOR map")
        try:
            return cls._validated(d)
        except (KeyError, TypeError, ValueError) as e:
            raise AnnouncementError(f"invalid announcement: {e}") from None

    @classmethod
    def _validated(cls, d: dict[str, Any]) -> ServerInfo:
        def text(key: str, *, required: bool = False, limit: int = MAX_NAME) -> str:
            v = d[key] if required else d.get(key, "")
            if not isinstance(v, str) or len(v) > limit:
                raise ValueError(f"{key} must be a string of at most {limit} characters")
            return v

        def strings(key: str, limit: int) -> tuple[str, ...]:
            v = d.get(key, [])
            if not isinstance(v, list) or len(v) > limit:
                raise ValueError(f"{key} must be a list of at most {limit} strings")
            if not all(isinstance(s, str) and len(s) <= MAX_NAME for s in v):
                raise ValueError(f"{key} must hold strings of at most {MAX_NAME} characters")
            return tuple(v)

        blocks = d["blocks"]
        if not (
            isinstance(blocks, list) and len(blocks) == 2 and all(type(b) is int for b in blocks)
        ):
            raise ValueError("blocks must be [start, end]")
        state = d.get("state", "joining")
        if state not in SERVER_STATES:
            raise ValueError(f"state must be one of {SERVER_STATES}")
        throughput = d.get("throughput", 0.0)
        if type(throughput) not in (int, float) or not math.isfinite(throughput) or throughput < 0:
            raise ValueError("throughput must be a finite number >= 0")
        cache = d.get("cache_tokens_free", 0)
        if type(cache) is not int or not 0 <= cache < 2**40:
            raise ValueError("cache_tokens_free must be an integer >= 0")
        relayed = d.get("relayed", False)
        if type(relayed) is not bool:
            raise ValueError("relayed must be a boolean")
        n_blocks = d.get("n_blocks", 0)
        if type(n_blocks) is not int or not (n_blocks == 0 or blocks[1] <= n_blocks <= MAX_BLOCKS):
            raise ValueError("n_blocks must be 0 or a block count covering the served span")
        hashes = d.get("weight_hashes", [])
        if not (
            isinstance(hashes, list)
            and (not hashes or len(hashes) == blocks[1] - blocks[0] <= MAX_WEIGHT_HASHES)
            and all(type(h) is bytes and len(h) == WEIGHT_HASH_BYTES for h in hashes)
        ):
            raise ValueError(
                f"weight_hashes must be empty or one {WEIGHT_HASH_BYTES}-byte digest per served "
                f"block (at most {MAX_WEIGHT_HASHES})"
            )
        model = text("model", required=True)
        if not model:
            raise ValueError("model must not be empty")
        return cls(
            model=model,
            blocks=BlockRange(blocks[0], blocks[1]),
            n_blocks=n_blocks,
            state=state,
            throughput=float(throughput),
            cache_tokens_free=cache,
            dtype=text("dtype", limit=32) or "float32",
            quant=text("quant", limit=32) or "none",
            adapters=strings("adapters", MAX_ADAPTERS),
            relayed=relayed,
            public_name=text("public_name", limit=64),
            addrs=strings("addrs", MAX_ADDRS),
            version=text("version", limit=64),
            weight_hashes=tuple(hashes),
        )
