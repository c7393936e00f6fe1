"""Public test helpers: real daemon processes on loopback, tiny model builders (later)."""

from petald.testing.processes import (
    DaemonExited,
    DaemonProcess,
    Processes,
    descendants,
    petald_json,
    petald_json_many,
    processes_naming,
    spawn_daemon,
    start_announcer,
    start_daemon,
    start_swarm,
    still_running,
    stop_all,
)

__all__ = [
    "DaemonExited",
    "DaemonProcess",
    "Processes",
    "descendants",
    "petald_json",
    "petald_json_many",
    "processes_naming",
    "spawn_daemon",
    "start_announcer",
    "start_daemon",
    "start_swarm",
    "still_running",
    "stop_all",
]
