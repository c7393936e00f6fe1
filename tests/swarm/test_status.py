"""`petald status` against real daemons: it joins, counts peers and prints valid JSON."""

import pytest

from petald.testing import DaemonProcess, petald_json

pytestmark = pytest.mark.slow


def test_status_reports_the_swarm(swarm8: list[DaemonProcess]) -> None:
    # Returns once joined and no server is listed (nodes serve none): no fixed listening time.
    st = petald_json(
        "status", "--json", "--initial-peers", swarm8[1].addr, "--expect-servers", "--wait", "30"
    )
    assert st["event"] == "status"
    assert st["peers"] >= len(swarm8) - 1
    assert st["models"] == []  # nodes serve no blocks
