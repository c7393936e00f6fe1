"""Waiting for what a client knows of the swarm: `wait_for_entry` returns once a `SwarmClient`'s
view has a given server in a given state (and span), re-checking on every change of the view and
re-reading the DHT every second meanwhile (gossip published before the client followed the
model reaches it only through the DHT), bounded by a timeout."""

from __future__ import annotations

import trio

from petald.client import SwarmClient
from petald.p2p.swarm_view import SwarmView

DHT_REREAD = 1.0  # seconds between DHT reads while waiting


def wait_for_entry(
    client: SwarmClient,
    model: str,
    peer: str,
    state: str,
    blocks: tuple[int, int] | None = None,
    *,
    timeout: float = 60.0,
) -> None:
    """Until `client`'s view has `peer` serving `model` in `state` (over `blocks` if given);
    raises trio.TooSlowError after `timeout` s. Call it from the client's caller thread."""

    def holds(view: SwarmView) -> bool:
        e = view.get(peer)
        if e is None or e.info.model != model or e.info.state != state:
            return False
        return blocks is None or (e.info.blocks.start, e.info.blocks.end) == blocks

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
