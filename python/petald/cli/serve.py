"""`petald serve MODEL --blocks START:END`: load only that span of MODEL (a model directory, a
.gguf file or a Hub id), join the swarm as a daemon, answer the block RPCs
(petald.server.handlers) and announce the span. Weights load before the event loop starts, with a
progress bar; the ready line is printed once the server is announced online."""

from __future__ import annotations

import logging
from pathlib import Path

from petald import __version__
from petald.daemon import main as daemon_main
from petald.p2p.config import P2PConfig
from petald.server.handlers import BlockHandlers
from petald.server.inference import InferenceSessions
from petald.server.loading import load_span
from petald.server.memory import CacheBudget, bytes_per_token, default_budget
from petald.stack import Stack
from petald.types import BlockRange, ServerInfo

log = logging.getLogger(__name__)


def model_name(source: str) -> str:
    """The name a model is announced under: a Hub id as given, else the file or directory name
    (without .gguf), so every server of the same checkpoint agrees."""
    path = Path(source)
    if path.exists():
        return path.stem if path.suffix == ".gguf" else path.resolve().name
    return source


def run(
    config: P2PConfig,
    source: str,
    blocks: str,
    dtype: str,
    device: str,
    name: str | None,
    cache_tokens: int | None = None,
) -> int:
    span_range = BlockRange.parse(blocks)
    if cache_tokens is not None and cache_tokens < 1:
        raise ValueError("--cache-tokens must be positive")
    span = load_span(source, span_range, dtype=dtype, device=device, progress=True)
    model = name or model_name(source)
    handlers = BlockHandlers(span, model)
    cfg = span.config
    kv_fraction = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    per_token = bytes_per_token(
        len(span_range), cfg.hidden_size, kv_fraction / cfg.num_attention_heads, span.dtype
    )
    budget = CacheBudget(cache_tokens or default_budget(per_token, span.device))
    sessions = InferenceSessions(handlers, budget)

    async def on_started(stack: Stack, reachability: str) -> None:
        handlers.register(stack.host.host)
        sessions.register(stack.host.host)
        assert stack.announcer is not None
        stack.announcer.announce(
            ServerInfo(
                model=model,
                blocks=span_range,
                n_blocks=int(span.config.num_hidden_layers),
                state="online",
                cache_tokens_free=budget.free_tokens,
                dtype=str(span.dtype).removeprefix("torch."),
                relayed=reachability == "private",
                addrs=tuple(stack.host.addrs()[:8]),
                version=__version__,
            )
        )
        log.info("serving %s blocks %s", model, span_range)

    return daemon_main(config, on_started=on_started)
