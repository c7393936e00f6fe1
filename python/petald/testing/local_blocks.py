"""In-process stand-ins for `RemoteSequential` and its `InferenceSession`, built on the server's
own `Span` (the code that serves blocks): a distributed model around `LocalBlocks(span)` runs the
client's code exactly as over a swarm, minus the network. For tests and the model-support census
(`petald.models.auto.build(DistributedModelForCausalLM, path, LocalBlocks(span))`)."""

from __future__ import annotations

from typing import Any

import torch

from petald.client import SessionStats
from petald.server.blocks import Span


class LocalSession:
    """`InferenceSession`'s interface over a `SpanCache`."""

    def __init__(self, span: Span, max_length: int, batch: int) -> None:
        self.span, self.batch, self.max_length = span, batch, max_length
        self.cache = span.new_cache(batch, max_length)
        self.position = 0
        self.stats = SessionStats()
        self.closed = False

    def step(
        self,
        hidden: Any,
        attention_mask: Any = None,
        position_ids: Any = None,
        *,
        reorder: Any = None,
    ) -> Any:
        if reorder is not None:
            self.cache.reorder(torch.as_tensor(reorder, dtype=torch.long))
        out = self.span.step(
            hidden,
            self.cache,
            self.position,
            attention_mask=attention_mask,
            position_ids=position_ids,
        )
        self.position += hidden.shape[1]
        self.stats.steps += 1
        return out

    def rollback(self, position: int) -> None:
        self.position = position

    def close(self) -> None:
        self.closed = True


class LocalBlocks:
    """`RemoteSequential`'s interface over a whole-model `Span`."""

    def __init__(self, span: Span) -> None:
        self.span = span
        self.sessions: list[LocalSession] = []

    def __call__(self, hidden: Any, attention_mask: Any = None, position_ids: Any = None) -> Any:
        return self.forward(hidden, attention_mask, position_ids)

    def forward(
        self, hidden: Any, attention_mask: Any = None, position_ids: Any = None, *, all_hidden=False
    ) -> Any:
        return self.span.forward(
            hidden, attention_mask=attention_mask, position_ids=position_ids, all_hidden=all_hidden
        )

    def inference_session(self, max_length: int, batch: int = 1) -> LocalSession:
        self.sessions.append(LocalSession(self.span, max_length, batch))
        return self.sessions[-1]
