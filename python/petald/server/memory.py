"""`CacheBudget`: the server's KV-cache token budget. An inference session reserves
batch * max_length tokens when it opens and gives them back when it closes, times out or its
peer disconnects; when the budget is spent, opening fails at once with a "busy" answer that says
how long to wait, so the client can go to another server instead of queueing here.

`--cache-tokens` sets the budget; the default is sized from free memory (`default_budget`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

# A session nobody steps for this long is closed and its tokens freed.
SESSION_IDLE_TIMEOUT = 300.0
# Sessions one peer may hold at once: more is a client bug or an attack on the budget.
MAX_SESSIONS_PER_PEER = 16


class Busy(Exception):
    def __init__(self, needed: int, free: int, retry_after: float) -> None:
        super().__init__(
            f"cache full: {needed} tokens asked, {free} free; retry in {retry_after:.0f} s "
            f"or use another server"
        )
        self.retry_after = retry_after


@dataclass
class CacheBudget:
    total_tokens: int
    used_tokens: int = 0

    @property
    def free_tokens(self) -> int:
        return self.total_tokens - self.used_tokens

    def reserve(self, tokens: int) -> None:
        """Takes `tokens` from the budget or raises `Busy` (never waits)."""
        if tokens > self.free_tokens:
            # Sessions end at the latest after the idle timeout; that is an honest upper bound.
            raise Busy(tokens, self.free_tokens, retry_after=SESSION_IDLE_TIMEOUT)
        self.used_tokens += tokens

    def release(self, tokens: int) -> None:
        self.used_tokens = max(0, self.used_tokens - tokens)


def default_budget(per_token: int, device_free_bytes: int | None) -> int:
    """Tokens that fit in a quarter of the free memory of the device (the compute process
    reports an accelerator's free bytes; None: CPU, host RAM): the rest stays for weights,
    activations and the system."""
    if device_free_bytes is not None:
        free = device_free_bytes
    else:
        pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
        free = pages * os.sysconf("SC_PAGE_SIZE") if pages else 8 << 30
    return max(1024, int(free // 4 // per_token))
