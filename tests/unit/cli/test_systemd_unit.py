"""`petald systemd-unit`: the unit runs exactly the serve command given, drains on stop, and a
bad serve command fails at once instead of at boot."""

from __future__ import annotations

import shlex
import sys

import pytest

from petald.cli import main


def unit_for(capsys, *argv: str) -> str:
    assert main(["systemd-unit", *argv]) == 0
    return capsys.readouterr().out


def test_unit_runs_the_serve_command_and_drains_on_stop(capsys) -> None:
    out = unit_for(
        capsys, "--user", "gpu", "--", "serve", "/srv/llama", "--blocks", "20:40",
        "--device", "cuda:1", "--drain-timeout", "120",
    )  # fmt: skip
    lines = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    argv = shlex.split(lines["ExecStart"])
    assert argv[:3] == [sys.executable, "-m", "petald.cli"]
    assert argv[3:9] == ["serve", "/srv/llama", "--blocks", "20:40", "--device", "cuda:1"]
    assert argv[argv.index("--identity") + 1] == "/var/lib/petald/identity.key"
    assert lines["User"] == "gpu" and lines["KillSignal"] == "SIGTERM"
    assert lines["TimeoutStopSec"] == "150"  # the drain timeout plus a margin
    assert "StateDirectory" in lines and lines["Restart"] == "on-failure"


def test_bad_serve_commands_fail_now(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["systemd-unit", "--", "serve", "/srv/llama", "--blokcs", "2:4"])
    assert e.value.code == 2
    assert main(["systemd-unit", "--", "node"]) == 2
    assert "give the serve command after --" in capsys.readouterr().err
