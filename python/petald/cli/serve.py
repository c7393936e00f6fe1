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
from petald.server.loading import load_span
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
    config: P2PConfig, source: str, blocks: str, dtype: str, device: str, name: str | None
) -> int:
    span_range = BlockRange.parse(blocks)
    span = load_span(source, span_range, dtype=dtype, device=device, progress=True)
    model = name or model_name(source)
    handlers = BlockHandlers(span, model)

    async def on_started(stack: Stack, reachability: str) -> None:
        handlers.register(stack.host.host)
        assert stack.announcer is not None
        stack.announcer.announce(
            ServerInfo(
                model=model,
                blocks=span_range,
                n_blocks=int(span.config.num_hidden_layers),
                state="online",
                dtype=str(span.dtype).removeprefix("torch."),
                relayed=reachability == "private",
                addrs=tuple(stack.host.addrs()[:8]),
                version=__version__,
            )
        )
        log.info("serving %s blocks %s", model, span_range)

    return daemon_main(config, on_started=on_started)
