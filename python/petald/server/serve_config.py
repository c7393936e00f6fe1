"""`ServeConfig`, what `petald serve` was asked to do, and `worker_spec`, the compute process's
part of it for one span. Light to import (no trio, no libp2p, no torch): the CLI builds both and
starts the compute process before it imports the daemon (petald.cli.serve)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from petald.types import BlockRange


@dataclass(frozen=True)
class ServeConfig:
    source: str
    model: str  # the name announced
    blocks: BlockRange | None = None  # None: choose `num_blocks` from the swarm
    num_blocks: int | None = None
    dtype: str = "auto"
    device: str = "cpu"
    quant: str = "none"
    adapters: tuple[str, ...] = ()  # peft LoRA directories clients may select by name
    cache_tokens: int | None = None
    throughput: str = "auto"  # auto (cached or measured), eval (measure again), or tokens/s
    drain_timeout: float = 60.0
    rebalance_period: float = 600.0
    public_name: str = ""
    # None: serve every peer of the swarm; else only these peer ids (petald.server.allow).
    allow_peers: frozenset[str] | None = None


def worker_spec(config: ServeConfig, span: BlockRange) -> dict[str, Any]:
    """The compute process's spec (petald.server.worker) for `span` of `config`'s model."""
    spec = {"source": config.source, "blocks": [span.start, span.end], "dtype": config.dtype}
    spec |= {"device": config.device, "quant": config.quant}
    return spec | {"adapters": list(config.adapters)}
