"""Fixtures for multi-process swarm tests: real `petald` daemons on 127.0.0.1, ports chosen by
the OS, readiness read from their JSON ready lines. Every process a test starts belongs to a
`Processes` (the `procs` fixture, or one a module fixture holds), which stops all of them
whatever fails."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from petald.testing import DaemonProcess, Processes


@pytest.fixture
def procs() -> Iterator[Processes]:
    """The test's own processes, stopped (reverse order, SIGTERM then SIGKILL) at teardown."""
    with Processes() as owned:
        yield owned


@pytest.fixture(scope="module")
def swarm8(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[DaemonProcess]]:
    with Processes() as owned:
        yield owned.swarm(8, tmp_path_factory.mktemp("swarm8"))


@pytest.fixture
def identity(tmp_path: Path) -> Path:
    return tmp_path / "client.key"
