"""Text out of generated tokens, a piece at a time, for `petald api`: `Detokenizer` turns each new
token into the text it adds, and `StopText` cuts that text at the first stop sequence. A streamed
answer is the concatenation of what they hand out, and a non-streamed one is built by the very
same calls, so both are the same text by construction. Pure (no I/O, no torch): each answer has
its own pair, used from the thread that generates it."""

from __future__ import annotations

import threading
from typing import Any

REPLACEMENT = "\ufffd"  # what a decode shows for the bytes of an unfinished UTF-8 character


class Detokenizer:
    """Incremental decoding as text-generation-inference does it (`decode_token`): each step
    decodes the few tokens since the last piece boundary, with and without the new one, and
    hands out the difference, so a token that is half of a character (byte-level vocabularies)
    or whose leading space depends on its predecessor (SentencePiece) comes out right, at a
    constant cost per token. `lock`: the tokenizer is shared by every request's thread, and a
    fast tokenizer refuses concurrent use ("Already borrowed")."""

    def __init__(self, tokenizer: Any, lock: threading.Lock) -> None:
        self.tokenizer = tokenizer
        self.lock = lock
        self.ids: list[int] = []
        self.prefix = 0  # the pieces handed out so far end at ids[read]...
        self.read = 0  # ...and ids[prefix:read] is the context that decoded them

    def _decode(self, ids: list[int]) -> str:
        with self.lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """The text `token` adds (maybe "" until a character is complete)."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """What is still held at the end (an unfinished character shows as U+FFFD, as a whole
        decode shows it)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :] if len(after) > len(before) else ""


class StopText:
    """The answer's text up to the first stop sequence, which is not part of it (as OpenAI).
    Text that could be the start of a stop sequence is held back until the next pieces say
    whether it is one, so no stop sequence is ever streamed, even split over tokens."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.text = ""
        self.sent = 0  # characters of `text` handed out
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Adds `piece`; returns the text now safe to hand out. Sets `stopped` on a stop."""
        if self.stopped:
            return ""
        self.text += piece
        # A stop cannot start before `sent`: text that could begin one was held back. The
        # stop is the one complete first, as if the text came a character at a time (at the
        # same character, the longer one): generation would have ended there.
        found = [(i + len(s), i) for s in self.stops if (i := self.text.find(s, self.sent)) >= 0]
        if found:
            end = min(found)[1]
            self.stopped = True
        else:
            end = len(self.text) - self._held()
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out

    def finish(self) -> str:
        """The text held back, at the end of the answer (it was no stop sequence)."""
        if self.stopped:
            return ""
        out, self.sent = self.text[self.sent :], len(self.text)
        return out

    def _held(self) -> int:
        """Characters at the end of the text that begin some stop sequence (the most of any)."""
        tail = len(self.text) - self.sent
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, tail), best, -1):
                if self.text.endswith(stop[:k]):
                    best = k
                    break
        return best
