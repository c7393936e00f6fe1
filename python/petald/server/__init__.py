"""Serving a span of a model's transformer blocks: `load_span` reads only the span's weights from
a HF model directory, a GGUF file or the Hub, and returns a `Span` that runs them exactly like
transformers does (forward with autograd, or step by step with a `SpanCache`)."""

from petald.errors import HubUnreachable
from petald.server.blocks import Span, SpanCache
from petald.server.checkpoint import LoadStats
from petald.server.loading import load_span

__all__ = ["HubUnreachable", "LoadStats", "Span", "SpanCache", "load_span"]
