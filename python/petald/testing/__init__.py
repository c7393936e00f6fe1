"""Public test helpers: real daemon processes on loopback, tiny model builders (later)."""

from petald.testing.processes import (
    DaemonProcess,
    petald_json,
    petald_json_many,
    spawn_daemon,
    start_announcer,
    start_daemon,
    start_swarm,
    stop_all,
)

__all__ = [
    "DaemonProcess",
    "petald_json",
    "petald_json_many",
    "spawn_daemon",
    "start_announcer",
    "start_daemon",
    "start_swarm",
    "stop_all",
]
