"""Churn during generation, for swarm tests: `AtTokens`, a `generate()` streamer that runs given
actions (kill a server, restart it, cut a link) once given numbers of new tokens are out, so
failures land at known tokens whatever the timing; and `wait_for_view`, which returns once a
`SwarmClient`'s view satisfies a predicate (re-checked on every change of the view, the DHT
re-read every second meanwhile), bounded by a timeout."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import trio

from petald.client import SwarmClient
from petald.p2p.swarm_view import SwarmView

DHT_REREAD = 1.0  # seconds between DHT reads while waiting


class AtTokens:
    """A streamer for `model.generate(..., streamer=...)`: after the n-th new token (1-based)
    is out, runs `actions[n]()` in the generating thread, so the next step waits for it (an
    action may block: a restart waits for the daemon's ready line there). `done` lists the
    token counts whose actions ran."""

    def __init__(self, actions: Mapping[int, Callable[[], None]]) -> None:
        self.actions = dict(actions)
        self.seen = -1  # the first put() is the prompt
        self.done: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        self.seen += 1
        action = self.actions.get(self.seen)
        if action is not None:
            action()
            self.done.append(self.seen)

    def end(self) -> None:
        pass


def wait_for_view(
    client: SwarmClient, model: str, holds: Callable[[SwarmView], bool], *, timeout: float
) -> None:
    """Until `holds(view)` for `client`'s view of `model`'s servers; raises trio.TooSlowError
    after `timeout` s. Call it from the client's caller thread (an `AtTokens` action is)."""

    async def wait() -> None:
        assert client.stack is not None and client.stack.announcer is not None
        announcer = client.stack.announcer
        with trio.fail_after(timeout):
            await client.watch(model)
            while not holds(announcer.view):  # each round: a view change or a DHT read
                try:
                    await announcer.wait_until(holds, timeout=DHT_REREAD)
                except trio.TooSlowError:
                    await announcer.refresh_from_dht(model)

    client.run(wait)
