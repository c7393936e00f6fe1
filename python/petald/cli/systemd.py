"""`petald systemd-unit [--user U] -- serve MODEL --blocks 20:40 ...`: print a systemd unit that
runs that `petald serve` command as a system service on a home server. The serve arguments are
parsed now, so a typo fails here and not at boot. The unit keeps the peer identity in the
service's StateDirectory (a stable peer id across restarts), the throughput and Hub caches in its
CacheDirectory, stops with SIGTERM (which drains sessions) and gives the drain time to finish.

    petald systemd-unit --user petald -- serve /srv/models/llama --blocks 20:40 \\
        --device cuda --initial-peers /ip4/.../p2p/... | sudo tee /etc/systemd/system/petald.service
    sudo systemctl daemon-reload && sudo systemctl enable --now petald"""

from __future__ import annotations

import argparse
import shlex
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--user", default="petald", help="the system user to run as (default: petald)")
    p.add_argument("--description", default="petald: serve transformer blocks to a swarm")
    p.add_argument(
        "serve_args",
        nargs=argparse.REMAINDER,
        metavar="-- serve MODEL ...",
        help="the `petald serve` command line, after --",
    )


def render(args: argparse.Namespace, serve_parser: argparse.ArgumentParser) -> str:
    argv = list(args.serve_args)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if argv[:1] != ["serve"]:
        raise ValueError("give the serve command after --, e.g. -- serve MODEL --blocks 20:40")
    serve = serve_parser.parse_args(argv[1:])  # exits with a usage message on a bad flag
    if serve.identity is None:
        argv += ["--identity", "/var/lib/petald/identity.key"]
    if serve.log_level == "warning":
        argv += ["--log-level", "info"]  # the journal is where a home server's owner looks
    exec_start = shlex.join([sys.executable, "-m", "petald.cli", *argv])
    stop_timeout = int(serve.drain_timeout) + 30
    return f"""[Unit]
Description={args.description}
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User={args.user}
ExecStart={exec_start}
# SIGTERM drains: no new sessions, active ones finish (--drain-timeout), then exit.
KillSignal=SIGTERM
TimeoutStopSec={stop_timeout}
Restart=on-failure
RestartSec=10
StateDirectory=petald
CacheDirectory=petald
Environment=PETALD_CACHE_DIR=/var/cache/petald HF_HOME=/var/cache/petald/huggingface
Environment=PYTHONUNBUFFERED=1
NoNewPrivileges=true
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=true

[Install]
WantedBy=multi-user.target
"""
