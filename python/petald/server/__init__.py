"""Serving a span of a model's transformer blocks: `load_span` reads only the span's weights from
a HF model directory, a GGUF file or the Hub, and returns a `Span` that runs them exactly like
transformers does (forward with autograd, or step by step with a `SpanCache`).

The exports load lazily: the daemon process of `petald serve` imports petald.server.* for its
RPC handlers and must not pay for transformers (hundreds of MB) — only its compute process
holds the model code."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from petald.errors import HubUnreachable
    from petald.server.blocks import Span, SpanCache
    from petald.server.checkpoint import LoadStats
    from petald.server.loading import load_span

__all__ = ["HubUnreachable", "LoadStats", "Span", "SpanCache", "load_span"]

_WHERE = {
    "HubUnreachable": "petald.errors",
    "LoadStats": "petald.server.checkpoint",
    "Span": "petald.server.blocks",
    "SpanCache": "petald.server.blocks",
    "load_span": "petald.server.loading",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'petald.server' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_WHERE[name]), name)
