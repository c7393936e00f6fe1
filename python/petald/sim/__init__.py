"""A simulation of a petald swarm in one process: the real DHT node, announcer, swarm view and
placement code of many peers over an in-memory network (`net`), on trio's virtual clock, so that
an hour of a 1,000-peer swarm runs in minutes. `python -m petald.sim --help` lists the scenarios;
`run_scenario` plays one and returns its measurements."""

from petald.sim.scenarios import DEFAULT, SCENARIOS, Scenario, run_scenario

__all__ = ["DEFAULT", "SCENARIOS", "Scenario", "run_scenario"]
