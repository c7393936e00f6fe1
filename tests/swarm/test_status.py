"""`petald status` against real daemons: it joins, counts peers and prints valid JSON."""

import pytest

from petald.testing import DaemonProcess, petald_json

pytestmark = pytest.mark.slow


def test_status_reports_the_swarm(swarm8: list[DaemonProcess]) -> None:
    st = petald_json("status", "--json", "--wait", "1", "--initial-peers", swarm8[1].addr)
    assert st["event"] == "status"
    assert st["peers"] >= len(swarm8) - 1
    assert st["models"] == []  # nodes serve no blocks
