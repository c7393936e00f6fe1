"""`History`: what an inference session keeps to rebuild a server's cache on failover, the
inputs of every cached token at each hop boundary of its route, (batch, length, hidden) each.

Appending a step writes only that step's tokens into a buffer that grows by doubling, so a
session of n tokens costs O(n) copies and at most twice its length in memory (concatenating
the whole history at every step costs O(n^2): 4k tokens of a 16k-wide model copy ~0.5 TB).
Views handed out (`get`) stay valid until the next `append`, `truncate` or `reorder`."""

from __future__ import annotations

import torch

# Tokens of the first buffer of a boundary (grown by doubling from there).
MIN_CAPACITY = 64


class History:
    def __init__(self) -> None:
        self._buffers: dict[int, torch.Tensor] = {}  # boundary -> (batch, capacity, hidden)
        self.length = 0

    def __contains__(self, boundary: int) -> bool:
        return boundary in self._buffers

    def boundaries(self) -> list[int]:
        return list(self._buffers)

    def get(self, boundary: int) -> torch.Tensor:
        """The inputs at `boundary` of the `length` cached tokens: (batch, length, hidden)."""
        return self._buffers[boundary][:, : self.length]

    def nbytes(self) -> int:
        """Bytes held (capacity, not length)."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def set(self, boundary: int, inputs: torch.Tensor) -> None:
        """Records `length` tokens' inputs at a boundary the history did not have (a new
        route's, after a failover replay)."""
        if inputs.shape[1] != self.length:
            raise ValueError(
                f"{inputs.shape[1]} tokens at a new boundary; the history has {self.length}"
            )
        self._buffers[boundary] = self._grown(None, inputs, self.length)
        self._buffers[boundary][:, : self.length] = inputs

    def append(self, inputs: dict[int, torch.Tensor]) -> None:
        """Adds one step's inputs, (batch, n, hidden) at every boundary of the route it took;
        boundaries it did not pass are forgotten (their route is gone)."""
        n = {x.shape[1] for x in inputs.values()}
        if len(n) != 1:
            raise ValueError("a step's inputs have one length at every boundary")
        end = self.length + n.pop()
        buffers = {}
        for b, x in inputs.items():
            old = self._buffers.get(b) if self.length else None
            if self.length and old is None:
                raise ValueError(f"boundary {b} has no history to append to")
            buf = self._grown(old, x, end)
            buf[:, self.length : end] = x
            buffers[b] = buf
        self._buffers, self.length = buffers, end

    def truncate(self, length: int) -> None:
        """Forgets the tokens at `length` and after (their slots are overwritten later)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate {self.length} tokens to {length}")
        self.length = length

    def reorder(self, index: torch.Tensor) -> None:
        """Sequence i becomes the former sequence index[i] (beam search)."""
        self._buffers = {b: buf.index_select(0, index) for b, buf in self._buffers.items()}

    def keep(self, boundaries: set[int]) -> None:
        self._buffers = {b: buf for b, buf in self._buffers.items() if b in boundaries}

    def _grown(self, old: torch.Tensor | None, like: torch.Tensor, end: int) -> torch.Tensor:
        """`old` if it holds `end` tokens (in `like`'s dtype), else a buffer of twice the
        capacity holding `old`'s tokens so far."""
        if old is not None and old.shape[1] >= end and old.dtype == like.dtype:
            return old
        capacity = max(MIN_CAPACITY, end, 2 * (old.shape[1] if old is not None else 0))
        buf = like.new_empty((like.shape[0], capacity, *like.shape[2:]))
        if old is not None and self.length:
            buf[:, : self.length] = old[:, : self.length]
        return buf
