"""The petald daemon process: identity, libp2p host, the DHT and (as they land) gossip and relay
services, under one trio nursery. It prints one JSON line on stdout once it is reachable, so
scripts and tests can wait for it, and stops cleanly on SIGINT/SIGTERM by cancelling the
nursery. Entry point: `run_daemon(config)`."""

from __future__ import annotations

import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable

import trio

from petald.dht.announce import AnnounceConfig
from petald.dht.node import DhtConfig
from petald.metrics import Metrics
from petald.notify import notifier
from petald.p2p.config import P2PConfig
from petald.p2p.dialback import DialBackService, determine_reachability
from petald.p2p.echo import EchoService
from petald.p2p.host import P2PHost
from petald.p2p.identity import default_identity_path, load_or_create_identity
from petald.server.startup import stamp
from petald.stack import Stack, build_stack

log = logging.getLogger(__name__)


def ready_line(
    host: P2PHost, reachability: str | None = None, metrics_url: str | None = None
) -> str:
    from petald import __version__

    line = {
        "event": "ready",
        "peer_id": host.peer_id,
        "addrs": host.addrs(),
        "version": __version__,
    }
    if reachability is not None:
        line["reachability"] = reachability
    if metrics_url is not None:
        line["metrics"] = metrics_url
    return json.dumps(line)


async def _stop_on_signal(
    cancel: Callable[[], None],
    drain: Callable[[], Awaitable[None]] | None,
    *,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """The first SIGINT/SIGTERM drains (if the daemon has work to drain), then stops; a second
    one stops at once."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async with trio.open_nursery() as nursery:
            async for sig in signals:
                name = signal.Signals(sig).name
                if drain is None or nursery.child_tasks:
                    log.info("received %s, stopping", name)
                    notifier().stopping("stopping")
                    cancel()
                    return
                log.info("received %s: draining (send it again to stop at once)", name)
                notifier().stopping("draining: active sessions finish, no new ones")
                print(json.dumps({"event": "draining"}), flush=True)

                async def drain_then_stop() -> None:
                    await drain()
                    cancel()

                nursery.start_soon(drain_then_stop)


async def run_daemon(
    config: P2PConfig,
    *,
    dht_config: DhtConfig | None = None,
    announce_config: AnnounceConfig | None = None,
    announce_ready: Callable[[str], None] | None = None,
    on_started: Callable[[Stack, str, trio.Nursery], Awaitable[None]] | None = None,
    on_drain: Callable[[], Awaitable[None]] | None = None,
    metrics: Metrics | None = None,
) -> None:
    """Runs until cancelled or signalled. `on_started(stack, reachability, nursery)` runs once
    joined (e.g. `petald serve` starts serving there), before the JSON ready line goes to
    `announce_ready` (default: printed on stdout). `on_drain` runs on the first signal.
    `metrics` (--metrics) is served from the start, before joining; its URL is in the ready line."""
    identity_path = config.identity or default_identity_path()
    key_pair, created = load_or_create_identity(identity_path)
    if created:
        log.info("created identity %s", identity_path)
    notify = notifier()  # systemd's notify socket, if under Type=notify (petald.notify)
    async with trio.open_nursery() as nursery:
        await nursery.start(_stop_on_signal, nursery.cancel_scope.cancel, on_drain)
        await nursery.start(notify.run)
        notify.status("starting a new swarm" if config.new_swarm else "joining the swarm")
        t0 = trio.current_time()
        stack = build_stack(
            key_pair,
            config,
            dht_config=dht_config,
            announce_config=announce_config,
            offer_hop=config.relay,
        )
        host, relay = stack.host, stack.relay
        EchoService(host.host).serve()
        metrics_url = None
        if metrics is not None:  # before the first connection: it counts their bytes
            metrics.watch_stack(stack)
            metrics_url = await nursery.start(metrics.serve)
        await stack.start(nursery, before_join=[DialBackService(host.host, host.pnet.key).run])
        t2 = trio.current_time()
        stamp("daemon.joined")
        log.info("joined and bootstrapped the DHT in %.2f s", t2 - t0)
        notify.status("checking reachability")
        # Private: stop offering HOP, reserve on relays among our peers, advertise the circuit
        # addresses (ready line and identify) before we say we are ready.
        reachability = await determine_reachability(host.host, config.reachability)
        log.info("reachability in %.2f s: %s", trio.current_time() - t2, reachability)
        if await relay.adopt(reachability.status):
            await host.push_addrs()
        stamp("daemon.reachability")
        if on_started is not None:  # e.g. `petald serve`: register block RPCs, announce
            await on_started(stack, reachability.status, nursery)
        line = ready_line(host, reachability.status, metrics_url)
        stamp("daemon.ready")
        if announce_ready is None:
            print(line, flush=True)
        else:
            announce_ready(line)
        if on_started is None:
            notify.status(f"online: {reachability.status} node {host.peer_id}")
        notify.ready()  # after the ready line: whoever waits on either sees the same state


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


def main(
    config: P2PConfig,
    dht_config: DhtConfig | None = None,
    announce_config: AnnounceConfig | None = None,
    on_started: Callable[[Stack, str, trio.Nursery], Awaitable[None]] | None = None,
    on_drain: Callable[[], Awaitable[None]] | None = None,
    metrics: Metrics | None = None,
) -> int:
    try:
        trio.run(
            lambda: run_daemon(
                config,
                dht_config=dht_config,
                announce_config=announce_config,
                on_started=on_started,
                on_drain=on_drain,
                metrics=metrics,
            )
        )
    except BaseExceptionGroup as group:
        # trio wraps errors raised in nurseries; a start-up failure such as "no initial peer
        # answered" is one error, and the CLI should print its message, not a group traceback.
        leaves = _leaves(group)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise
    finally:
        notifier().close()
    print(json.dumps({"event": "stopped"}), flush=True)
    sys.stdout.flush()
    return 0
