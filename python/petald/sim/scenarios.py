"""The swarm scenarios (`SCENARIOS`) and `run_scenario`, which plays one on a `SimSwarm` under
trio's `MockClock` and returns its `Measurements`.

A scenario has a warm-up (peers join one by one, spread over `warmup_minutes`; the servers among
them announce spans that tile the model) and a measured phase of `minutes`, during which churn
replaces peers (a leaver vanishes, a newcomer with a new identity takes its role), a flash crowd
adds servers within a minute, or the network splits in two halves and heals. Probes measure what
the daemons' own lookups do not tell: whether a lookup finds the truly closest live peer."""

from __future__ import annotations

import resource
from dataclasses import dataclass, replace

import trio
import trio.testing

from petald.dht.announce import AnnounceConfig
from petald.dht.node import DhtConfig
from petald.sim.measure import Recorder, rss_bytes
from petald.sim.swarm import SimPeer, SimSwarm
from petald.types import BlockRange

N_BLOCKS = 80
SPAN = 8


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    peers: int = 1000
    servers: int = 100  # of `peers`: announce a span; the others are `petald node`s
    minutes: float = 60.0
    churn_per_hour: float = 0.10  # fraction of the peers replaced per hour
    flash_crowd: int = 0  # servers joining within one minute, a third into the phase
    new_servers: int = 5  # servers joining one by one in the phase's first half (reach measured)
    partition: tuple[float, float] | None = None  # (split, heal) as fractions of the phase
    warmup_minutes: float = 5.0
    seed: int = 0


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("steady", "1,000 peers (100 servers), no churn, one hour", churn_per_hour=0.0),
        Scenario("churn10", "the default: 1,000 peers, 10 %/hour churn, one hour"),
        Scenario("churn50", "1,000 peers, 50 %/hour churn, one hour", churn_per_hour=0.5),
        Scenario(
            "flash-crowd",
            "1,000 peers; 200 new servers join within one minute; 30 minutes",
            minutes=30.0,
            flash_crowd=200,
        ),
        Scenario(
            "partition",
            "1,000 peers split into two halves at minute 10, healed at minute 20; 40 minutes",
            minutes=40.0,
            churn_per_hour=0.0,
            partition=(0.25, 0.5),
        ),
    )
}
DEFAULT = "churn10"


def span_for(i: int) -> BlockRange:
    """Server i's span: consecutive servers tile the model (0:8, 8:16, ...)."""
    start = (i * SPAN) % N_BLOCKS
    return BlockRange(start, start + SPAN)


async def _play(sc: Scenario, swarm: SimSwarm, rec: Recorder) -> None:
    rng = swarm.rng
    roles = [i < sc.servers for i in range(sc.peers)]
    rng.shuffle(roles)
    roles[0] = False  # the first peer starts the swarm
    n_servers = 0
    gap = sc.warmup_minutes * 60 / max(sc.peers, 1)
    for is_server in roles:
        info = swarm.server_info(span_for(n_servers)) if is_server else None
        n_servers += is_server
        peer = swarm.join(info)
        if len(swarm.peers) == 1:
            await peer.ready.wait()
        await trio.sleep(gap)
    await trio.sleep(2 * swarm.announce_config.heartbeat)  # the last joiners settle
    rec.start(sc.minutes)

    events: list[tuple[float, str]] = []
    for _ in range(round(sc.churn_per_hour * sc.peers * sc.minutes / 60)):
        events.append((rng.uniform(0, sc.minutes * 60), "churn"))
    if sc.flash_crowd:
        at = sc.minutes * 60 / 3
        events += [(at + rng.uniform(0, 60), "flash") for _ in range(sc.flash_crowd)]
    for i in range(sc.new_servers):
        events.append(((i + 0.5) * sc.minutes * 30 / sc.new_servers, "flash"))
    if sc.partition:
        split, heal = (f * sc.minutes * 60 for f in sc.partition)
        events += [(split, "split"), (heal, "heal")]
    events.sort()
    t0 = trio.current_time()
    for at, what in events:
        await trio.sleep_until(t0 + at)
        if what == "churn":
            leaver = rng.choice(swarm.live())
            swarm.leave(leaver)
            rec.track_join(swarm.join(leaver.info))
        elif what == "flash":
            rec.track_join(swarm.join(swarm.server_info(span_for(n_servers))))
            n_servers += 1
        elif what == "split":
            live = swarm.live()
            rng.shuffle(live)
            swarm.net.split({p.peer_id: i % 2 for i, p in enumerate(live)})
            rec.mark("split")
        elif what == "heal":
            swarm.net.heal()
            rec.mark("heal")
    await trio.sleep_until(t0 + sc.minutes * 60)


async def _run(sc: Scenario, dht: DhtConfig, announce: AnnounceConfig) -> dict:
    async with trio.open_nursery() as nursery:
        swarm = SimSwarm(nursery, seed=sc.seed, dht_config=dht, announce_config=announce)
        rec = Recorder(swarm, rss_before=rss_bytes())
        nursery.start_soon(rec.run)
        await _play(sc, swarm, rec)
        result = rec.finish()
        nursery.cancel_scope.cancel()
    return result


def run_scenario(
    sc: Scenario, *, dht: DhtConfig | None = None, announce: AnnounceConfig | None = None
) -> dict:
    """Plays `sc` on the virtual clock; returns the measurements as a JSON-able dict."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    cpu = resource.getrusage(resource.RUSAGE_SELF).ru_utime
    result = trio.run(_run, sc, dht or DhtConfig(), announce or AnnounceConfig(), clock=clock)
    result["scenario"] = sc.name
    result["cpu_seconds"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu, 1)
    return result


def scaled(sc: Scenario, **changes: object) -> Scenario:
    return replace(sc, **changes)  # type: ignore[arg-type]


__all__ = ["DEFAULT", "SCENARIOS", "Scenario", "SimPeer", "run_scenario", "scaled"]
