"""`petald systemd-unit [--user U] -- serve MODEL --blocks 20:40 ...` (or `-- node ...`): print a
systemd unit that runs that command as a system service on a home server. The command is parsed
now, so a typo fails here and not at boot, and written back with every path made absolute (the
service runs in /, where a relative --swarm-key or model directory would point nowhere).

The unit is `Type=notify`: the daemon tells systemd when it is online (`READY=1`, after loading
and announcing: dependent units start then), what it is doing meanwhile (`STATUS=`, shown by
`systemctl status`), and pings a watchdog from its event loop, so a hung daemon is restarted
(petald.notify). The peer identity lives in the StateDirectory (a stable peer id across
restarts), the throughput and Hub caches in the CacheDirectory, the config file in the
ConfigurationDirectory (/etc/petald/petald.toml, petald.cli.config). SIGTERM drains sessions,
and the stop timeout gives the drain time to finish.

Hardening left out, because it breaks CUDA or torch: PrivateDevices= and DevicePolicy=closed
(hide /dev/nvidia*), ProtectClock= (implies DeviceAllow=char-rtc r, which closes every other
device, the GPUs too), MemoryDenyWriteExecute= (CUDA's PTX JIT, torch's and Triton's kernels
and libffi closures map writable+executable memory), ProcSubset=pid (hides /proc/meminfo and
/proc/cpuinfo, which size the KV cache and torch's threads), SystemCallFilter= (not verified with
the NVIDIA driver and OpenMP: a call it blocks kills the service with SIGSYS), PrivateUsers=
(device nodes' groups, e.g. render for ROCm, become nobody).

    petald systemd-unit --user petald -- serve /srv/models/llama --blocks 20:40 \\
        --device cuda --initial-peers /ip4/.../p2p/... | sudo tee /etc/systemd/system/petald.service
    sudo systemctl daemon-reload && sudo systemctl enable --now petald"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from petald.cli.config import add_config_flag, config_file, file_layer, read_file, set_defaults

STATE = "/var/lib/petald"
CACHE = "/var/cache/petald"
COMMANDS = ("serve", "node")
HOMES = ("/home", "/root", "/run/user")  # what ProtectHome=true hides


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--user", default="petald", help="the system user to run as (default: petald)")
    p.add_argument("--description", default=None, help="the unit's Description=")
    p.add_argument(
        "--watchdog",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="restart the daemon if its event loop does not ping for this long (WatchdogSec=; "
        "default: 60; 0: no watchdog)",
    )
    p.add_argument(
        "--start-timeout",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="time to load the blocks (and download them from the Hub) and come online before "
        "systemd gives up (TimeoutStartSec=; default: 3600)",
    )
    p.add_argument(
        "command_args",
        nargs=argparse.REMAINDER,
        metavar="-- serve|node ...",
        help="the `petald serve` (or `petald node`) command line, after --",
    )


def _absolute(value: str) -> str:
    return os.path.abspath(os.path.expanduser(value))


def _maybe_path(value: str) -> str:
    """A model or --allow-peers value: a path if one exists there (else a Hub id, peer ids)."""
    pathlike = value.startswith(("./", "../", "~", "/"))  # never a Hub id
    return _absolute(value) if pathlike or Path(os.path.expanduser(value)).exists() else value


# The flags (by dest) that name files or directories, and how each is made absolute.
PATHS: dict[str, Any] = {
    "model": _maybe_path,
    "allow_peers": _maybe_path,
    "identity": _absolute,
    "swarm_key": _absolute,
    "adapters": _absolute,
    "config": _absolute,
}


def command_line(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> list[str]:
    """The flags of `ns` that differ from the parser's defaults, in the parser's order, with
    their paths absolute: the same command, runnable from any directory."""
    out: list[str] = []
    for action in parser._actions:
        if action.dest in ("help", "version") or not hasattr(ns, action.dest):
            continue
        value = getattr(ns, action.dest)
        if value == action.default:
            continue
        fix = PATHS.get(action.dest)
        values = value if isinstance(value, list) else [value]
        text = [fix(str(v)) if fix else str(v) for v in values]
        if not action.option_strings:
            out += text
        elif action.nargs == 0:  # store_true / store_false: the flag itself says it
            out.append(action.option_strings[-1])
        else:
            out += [action.option_strings[-1], *text]
    return out


def render(args: argparse.Namespace, petald: argparse.ArgumentParser) -> str:
    """The unit for `args.command_args`, parsed with `petald`'s own subcommand parser."""
    argv = list(args.command_args)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if argv[:1] not in ([c] for c in COMMANDS):
        raise ValueError("give the serve command after --, e.g. -- serve MODEL --blocks 20:40")
    if args.watchdog < 0 or args.start_timeout <= 0:
        raise ValueError("--watchdog must be >= 0 and --start-timeout positive")
    command = argv[0]
    parser = subparser(petald, command)
    parser.prog = f"petald {command}"
    add_config_flag(parser)
    # The config file the service will read too (not this shell's PETALD_* variables: the
    # service does not have them): what it sets need not be repeated on the command line.
    path = config_file(argv[1:], {})
    if path is not None:
        set_defaults(parser, file_layer(petald, path, read_file(path))[command])
    ns = parser.parse_args(argv[1:])  # exits with a usage message on a bad flag
    if ns.identity is None:
        ns.identity = Path(STATE) / "identity.key"
    if ns.log_level == "warning":
        ns.log_level = "info"  # the journal is where a home server's owner looks
    flags = command_line(parser, ns)
    exec_start = shlex.join([sys.executable, "-m", "petald.cli", command, *flags])
    drain = getattr(ns, "drain_timeout", 0.0)
    home = any(p.startswith(HOMES) for p in [sys.executable, *flags] if p.startswith("/"))
    description = args.description or f"petald {command}: " + (
        "serve transformer blocks to a swarm" if command == "serve" else "a swarm's bootstrap node"
    )
    watchdog = f"WatchdogSec={args.watchdog:g}\n" if args.watchdog > 0 else ""
    return f"""[Unit]
Description={description}
Wants=network-online.target
After=network-online.target

[Service]
# READY=1 once online (blocks loaded, announced); STATUS= while loading; WATCHDOG=1 pings from
# the event loop (petald.notify).
Type=notify
NotifyAccess=main
{watchdog}TimeoutStartSec={args.start_timeout:g}
User={args.user}
ExecStart={exec_start}
# SIGTERM drains: no new sessions, active ones finish (--drain-timeout), then exit.
KillSignal=SIGTERM
TimeoutStopSec={int(drain) + 30}
Restart=on-failure
RestartSec=10
StateDirectory=petald
CacheDirectory=petald
ConfigurationDirectory=petald
Environment=PETALD_CACHE_DIR={CACHE} HF_HOME={CACHE}/huggingface XDG_CACHE_HOME={CACHE}
Environment=CUDA_CACHE_PATH={CACHE}/nv PYTHONUNBUFFERED=1
# Hardening (what CUDA and torch allow: see `pydoc petald.cli.systemd` for what is left out).
NoNewPrivileges=true
PrivateTmp=true
ProtectSystem=strict
ProtectHome={"read-only" if home else "true"}
ProtectKernelTunables=true
ProtectKernelModules=true
ProtectKernelLogs=true
ProtectControlGroups=true
ProtectHostname=true
ProtectProc=invisible
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=true
RestrictRealtime=true
RestrictSUIDSGID=true
LockPersonality=true
SystemCallArchitectures=native
CapabilityBoundingSet=
RemoveIPC=true
UMask=0077

[Install]
WantedBy=multi-user.target
"""


def subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """`petald COMMAND`'s own parser, from the top-level one."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise KeyError(command)
