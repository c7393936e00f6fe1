"""`petald systemd-unit`: the unit runs exactly the command given (serve or node) with its paths
made absolute, is Type=notify with a watchdog and the hardening CUDA allows, drains on stop, passes
`systemd-analyze verify`, and a bad command fails at once instead of at boot."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from petald.cli import main


def unit_for(capsys, *argv: str) -> str:
    assert main(["systemd-unit", *argv]) == 0
    return capsys.readouterr().out


def settings(unit: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in unit.splitlines() if "=" in line[:40])


def test_unit_runs_the_serve_command_and_drains_on_stop(capsys) -> None:
    out = unit_for(
        capsys, "--user", "gpu", "--watchdog", "30", "--", "serve", "/srv/llama",
        "--blocks", "20:40", "--device", "cuda:1", "--drain-timeout", "120",
    )  # fmt: skip
    lines = settings(out)
    argv = shlex.split(lines["ExecStart"])
    assert argv[:3] == [sys.executable, "-m", "petald.cli"]
    assert argv[3:9] == ["serve", "/srv/llama", "--blocks", "20:40", "--device", "cuda:1"]
    assert argv[argv.index("--drain-timeout") + 1] == "120.0"
    assert argv[argv.index("--identity") + 1] == "/var/lib/petald/identity.key"
    assert lines["User"] == "gpu" and lines["KillSignal"] == "SIGTERM"
    assert lines["TimeoutStopSec"] == "150"  # the drain timeout plus a margin
    assert "StateDirectory" in lines and lines["Restart"] == "on-failure"
    assert lines["Type"] == "notify" and lines["NotifyAccess"] == "main"
    assert lines["WatchdogSec"] == "30" and float(lines["TimeoutStartSec"]) >= 600
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectKernelTunables", "ProtectKernelModules"):
        assert lines[key] == "true"
    assert lines["ProtectSystem"] == "strict" and lines["ConfigurationDirectory"] == "petald"
    assert lines["RestrictAddressFamilies"] == "AF_INET AF_INET6 AF_UNIX"
    # These would hide or close the GPUs (petald.cli.systemd says why).
    for key in ("PrivateDevices", "ProtectClock", "MemoryDenyWriteExecute", "DevicePolicy"):
        assert key not in lines


def test_relative_paths_become_absolute(capsys, tmp_path: Path, monkeypatch) -> None:
    """The service runs in /: every path it is given must be absolute. Catches: a relative
    --swarm-key, --identity, --allow-peers file, adapter or model directory passed through."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "llama").mkdir()
    (tmp_path / "peers.txt").write_text("12D3KooWGzh2vXGW1pNLWp2D3fRVb6XbGkqKHMHs4Y6gCKWPYqHq\n")
    (tmp_path / "lora" / "chat").mkdir(parents=True)
    (tmp_path / "lora" / "chat" / "adapter_model.safetensors").write_bytes(b"")
    out = unit_for(
        capsys, "--", "serve", "llama", "--blocks", "0:2", "--swarm-key", "swarm.key",
        "--identity", "keys/id.key", "--allow-peers", "peers.txt", "--adapters", "lora/chat",
    )  # fmt: skip
    argv = shlex.split(settings(out)["ExecStart"])
    after = {flag: argv[argv.index(flag) + 1] for flag in argv if flag.startswith("--")}
    assert argv[4] == str(tmp_path / "llama")
    assert after["--swarm-key"] == str(tmp_path / "swarm.key")
    assert after["--identity"] == str(tmp_path / "keys" / "id.key")
    assert after["--allow-peers"] == str(tmp_path / "peers.txt")
    assert after["--adapters"] == str(tmp_path / "lora" / "chat")
    # A Hub id and peer ids stay as they are.
    peer = "12D3KooWGzh2vXGW1pNLWp2D3fRVb6XbGkqKHMHs4Y6gCKWPYqHq"
    out = unit_for(capsys, "--", "serve", "org/model", "--blocks", "0:2", "--allow-peers", peer)
    argv = shlex.split(settings(out)["ExecStart"])
    assert argv[4] == "org/model" and argv[argv.index("--allow-peers") + 1] == peer


def test_node_unit(capsys) -> None:
    out = unit_for(capsys, "--watchdog", "0", "--", "node", "--new-swarm", "--no-relay")
    lines = settings(out)
    argv = shlex.split(lines["ExecStart"])
    assert argv[3] == "node" and {"--new-swarm", "--no-relay"} <= set(argv)
    assert lines["Type"] == "notify" and "WatchdogSec" not in lines


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify_accepts_the_unit(capsys, tmp_path: Path) -> None:
    """systemd's own parser: every key known, every value valid, ExecStart executable.
    Catches: a misspelt or unknown directive (a warning, not an error: stderr must be empty)."""
    unit = tmp_path / "petald.service"
    unit.write_text(unit_for(capsys, "--", "serve", "/srv/llama", "--blocks", "0:2"))
    r = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_bad_commands_fail_now(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["systemd-unit", "--", "serve", "/srv/llama", "--blokcs", "2:4"])
    assert e.value.code == 2
    assert main(["systemd-unit", "--", "chat"]) == 2
    assert "give the serve command after --" in capsys.readouterr().err
