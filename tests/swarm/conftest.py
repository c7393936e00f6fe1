"""Fixtures for multi-process swarm tests: real `petald` daemons on 127.0.0.1, ports chosen by
the OS, readiness read from their JSON ready lines."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from petald.testing import DaemonProcess, start_swarm, stop_all


@pytest.fixture(scope="module")
def swarm8(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[DaemonProcess]]:
    daemons = start_swarm(8, tmp_path_factory.mktemp("swarm8"))
    yield daemons
    stop_all(daemons)


@pytest.fixture
def identity(tmp_path: Path) -> Path:
    return tmp_path / "client.key"
