"""Public test helpers: real daemon processes on loopback, tiny model builders (later)."""

from petald.testing.processes import DaemonProcess, start_daemon

__all__ = ["DaemonProcess", "start_daemon"]
