"""The `petald` command. Each subcommand parses its flags into a config and runs; errors in
user input exit with status 2 and a one-line message, never a traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from petald import __version__
from petald.cli.api import add_arguments as add_api_arguments
from petald.cli.chat import add_arguments as add_chat_arguments
from petald.cli.chat import add_swarm_key_arg
from petald.cli.config import apply_config
from petald.cli.config_show import add_command as add_config_command
from petald.cli.demo import add_arguments as add_demo_arguments
from petald.cli.serve import add_arguments as add_serve_arguments
from petald.cli.serve import add_metrics_arg, metrics_of
from petald.cli.systemd import add_arguments as add_systemd_arguments
from petald.cli.weights import add_arguments as add_weights_arguments
from petald.errors import PetaldError
from petald.server.openmp import with_openmp_defaults
from petald.server.startup import stamp

if TYPE_CHECKING:  # importing py-libp2p costs ~2 s; `petald --help` should not pay it
    from petald.dht.node import DhtConfig
    from petald.p2p.config import P2PConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="petald",
        description="Run and fine-tune large language models over a peer-to-peer swarm.",
    )
    parser.add_argument("--version", action="version", version=f"petald {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "core-demo",
        help="show the Rust core at work: tensor frames, codecs and the Kademlia routing table",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    node = sub.add_parser(
        "node",
        help="run a daemon that serves no blocks: a bootstrap peer, DHT node and relay",
        description="Run a petald daemon without blocks. Prints one JSON line with its peer id "
        "and addresses once reachable; stops cleanly on SIGINT/SIGTERM.",
    )
    add_p2p_args(node)
    add_dht_args(node, refresh=True)
    add_metrics_arg(node)
    dht = sub.add_parser("dht", help="read or write a record in a swarm's DHT (as a client)")
    dht.add_argument("op", choices=["get", "put"])
    dht.add_argument("key")
    dht.add_argument("value", nargs="?")
    dht.add_argument("--ttl", type=float, default=600.0, help="seconds a put record lives")
    dht.add_argument("--rpc-timeout", type=float, default=5.0, help="seconds per DHT request")
    add_p2p_args(dht, listen_default="/ip4/127.0.0.1/tcp/0")
    add_dht_args(dht, refresh=False)
    ping = sub.add_parser(
        "ping",
        help="measure round trips to a peer over /petald/echo (direct or through a relay)",
        description="Connect to MULTIADDR (a /p2p-circuit address goes through its relay), run "
        "round trips over /petald/echo/1.0.0 and print one JSON line.",
    )
    ping.add_argument("multiaddr", metavar="MULTIADDR", help="full address ending in /p2p/<id>")
    ping.add_argument("--count", type=int, default=10, help="round trips (default: 10)")
    ping.add_argument(
        "--payload-bytes", type=int, default=1024, help="bytes per round trip (default: 1024)"
    )
    ping.add_argument("--timeout", type=float, default=60.0, help="seconds for the whole run")
    add_swarm_key_arg(ping)
    ping.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    serve = sub.add_parser(
        "serve",
        help="serve a span of a model's transformer blocks to the swarm",
        description="Join the swarm, load blocks START:END of MODEL (a model directory, a .gguf "
        "file or a Hub id) and serve them. Prints one JSON line when online. The first "
        "SIGTERM/SIGINT drains (no new sessions, active ones finish), a second one stops.",
    )
    add_serve_arguments(serve)
    add_p2p_args(serve)
    unit = sub.add_parser(
        "systemd-unit",
        help="print a systemd unit (Type=notify, hardened) that runs a `petald serve` or "
        "`petald node` command as a service",
        description="Print a systemd unit for the `petald serve` (or node) command given after "
        "--, its paths made absolute. "
        "Example: petald systemd-unit -- serve /srv/llama --blocks 20:40 --device cuda "
        "| sudo tee /etc/systemd/system/petald.service",
    )
    add_systemd_arguments(unit)
    status = sub.add_parser(
        "status",
        help="show what a swarm serves: models, block coverage, servers",
        description="Join a swarm as a client, listen to its announcements for --wait seconds "
        "and print models, block coverage (ranges and how many servers serve them) and servers.",
    )
    status.add_argument("--json", action="store_true", help="one JSON object instead of text")
    status.add_argument(
        "--web",
        action="store_true",
        help="keep running and serve a self-refreshing health page of the swarm (and its JSON "
        "at /api/status) on --listen HOST:PORT (default: 127.0.0.1:8001; port 0: any free "
        "one); prints a JSON ready line with its URL",
    )
    status.add_argument(
        "--model", action="append", default=[], help="also look up this model in the DHT"
    )
    status.add_argument("--wait", type=float, default=3.0, help="seconds to listen (default: 3)")
    status.add_argument(
        "--expect-servers",
        nargs="*",
        metavar="PEER_ID",
        help="return as soon as the servers listed are exactly these peers (none: no server), "
        "--wait seconds at most; exit status 1 if they are not by then (for scripts and tests)",
    )
    add_p2p_args(status, listen_default="/ip4/127.0.0.1/tcp/0")
    chat = sub.add_parser(
        "chat",
        help="chat in the terminal with a model served by a swarm (a local one by default)",
        description="Chat with MODEL, whose blocks run on the swarm joined through "
        "--initial-peers; without it, start a local swarm of MODEL (default: the demo model) "
        "and stop it on exit. Answers stream as they are generated; /reset, /exit.",
    )
    add_chat_arguments(chat)
    api = sub.add_parser(
        "api",
        help="serve an OpenAI-compatible HTTP API for a model on a swarm (a local one by default)",
        description="Answer OpenAI's /v1/chat/completions, /v1/completions and /v1/models "
        "for MODEL, whose blocks run on the swarm joined through --initial-peers; without it, "
        "start a local swarm of MODEL (default: the demo model) and stop it on exit. Prints "
        "one JSON line once it answers; SIGINT/SIGTERM stop it. --max-new-tokens bounds a "
        "request's max_tokens (and is the chat default).",
    )
    add_api_arguments(api)
    demo = sub.add_parser(
        "demo",
        help="start a local swarm of the demo model, ask it one question, stop the swarm",
        description="Start a bootstrap node and --servers `petald serve` processes, each "
        "hosting an equal share of MODEL's blocks (default: the demo model), ask QUESTION "
        "with greedy decoding, print the answer and timings, and stop everything.",
    )
    add_demo_arguments(demo)
    key = sub.add_parser(
        "swarm-key",
        help="create a private swarm's pre-shared key file (for --swarm-key)",
        description="new [FILE]: write a fresh random libp2p pnet key (/key/swarm/psk/1.0.0/) "
        "to FILE (default: swarm.key), mode 0600; refuses to overwrite a file. Give the same "
        "file to every peer of the swarm: peers without it cannot connect.",
    )
    key.add_argument("op", choices=["new"])
    key.add_argument("file", nargs="?", type=Path, default=Path("swarm.key"), metavar="FILE")
    weights = sub.add_parser(
        "weights-hash",
        help="print the weight hashes servers of MODEL announce, as a --trusted-weights file",
        description="Load MODEL's blocks as `petald serve` does and write the hash of each "
        "block's weights (JSON): clients given it with --trusted-weights route only through "
        "servers announcing the same hashes (petald.client.trust).",
    )
    add_weights_arguments(weights)
    add_config_command(sub)
    return parser


def add_p2p_args(p: argparse.ArgumentParser, *, listen_default: str | None = None) -> None:
    p.add_argument(
        "--listen",
        nargs="+",
        metavar="MULTIADDR",
        default=[listen_default] if listen_default else None,
        help=f"addresses to listen on (default: {listen_default or '/ip4/0.0.0.0/tcp/0'})",
    )
    p.add_argument(
        "--announce", nargs="+", metavar="MULTIADDR", default=[], help="addresses to advertise"
    )
    p.add_argument(
        "--initial-peers",
        nargs="+",
        metavar="MULTIADDR",
        default=[],
        help="peers to join through, full addresses ending in /p2p/<peer id>",
    )
    p.add_argument(
        "--new-swarm", action="store_true", help="start a new swarm instead of joining one"
    )
    p.add_argument(
        "--identity",
        type=Path,
        metavar="PATH",
        help="key file, created mode 0600 on first start (default: "
        "~/.local/share/petald/identity.key)",
    )
    p.add_argument(
        "--reachability",
        default="auto",
        choices=["auto", "public", "private"],
        help="auto (default): ask connected peers to dial us back after joining; private: "
        "reserve a slot on a relay and advertise the /p2p-circuit address",
    )
    p.add_argument(
        "--no-relay",
        dest="relay",
        action="store_false",
        help="do not relay for private peers, even when publicly reachable",
    )
    add_swarm_key_arg(p)
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])


def add_dht_args(p: argparse.ArgumentParser, *, refresh: bool) -> None:
    p.add_argument(
        "--dht-k",
        type=int,
        default=20,
        metavar="K",
        help="Kademlia bucket size and replication: records go to the K peers closest to "
        "their key (default: 20; every peer of the swarm must use the same K)",
    )
    if refresh:
        p.add_argument(
            "--dht-refresh-interval",
            type=float,
            default=600.0,
            metavar="SECONDS",
            help="look up a random key in each routing-table bucket with no lookup for this "
            "long (default: 600)",
        )


def dht_config(args: argparse.Namespace) -> DhtConfig:
    from petald.dht.node import DhtConfig

    if args.dht_k < 1:
        raise ValueError("--dht-k must be at least 1")
    refresh = getattr(args, "dht_refresh_interval", 600.0)
    if not refresh > 0:
        raise ValueError("--dht-refresh-interval must be positive")
    return DhtConfig(k=args.dht_k, refresh_interval=refresh)


def p2p_config(args: argparse.Namespace) -> P2PConfig:
    from petald.p2p.config import DEFAULT_LISTEN, P2PConfig

    return P2PConfig(
        listen=tuple(args.listen or DEFAULT_LISTEN),
        announce=tuple(args.announce),
        initial_peers=tuple(args.initial_peers),
        new_swarm=args.new_swarm,
        identity=args.identity,
        reachability=args.reachability,
        relay=args.relay,
        swarm_key=args.swarm_key,
    )


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # py-libp2p logs routine, harmless events at ERROR (a relay logs one per circuit, a
    # short-lived dial-back host refuses gossipsub): show its logs only when debugging.
    if level != "debug":
        import libp2p  # noqa: F401 - it sets up its loggers on import; quiet them after that

        logging.getLogger("libp2p").setLevel(logging.CRITICAL)


def main(argv: list[str] | None = None) -> int:
    # Before torch loads (libgomp reads them when it loads): petald's OpenMP settings, for this
    # process and the children it starts; why these: petald.server.openmp.
    stamp("daemon.main")
    os.environ.update(with_openmp_defaults(os.environ))
    parser = _parser()
    try:  # the config file and PETALD_* variables become defaults (petald.cli.config)
        read, layers = apply_config(parser, sys.argv[1:] if argv is None else argv, os.environ)
    except ValueError as e:
        print(f"petald: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        if args.command == "swarm-key":
            from petald.p2p.pnet import write_new_key

            write_new_key(args.file)
            print(
                f"wrote a new swarm key to {args.file} (mode 0600); give it to every peer "
                f"of the swarm with --swarm-key {args.file}"
            )
            return 0
        if args.command == "weights-hash":
            from petald.cli.weights import run as weights_run

            setup_logging("warning")
            return weights_run(args)
        if args.command == "core-demo":
            from petald.cli.core_demo import run

            return run(seed=args.seed)
        if args.command == "node":
            from petald.daemon import main as daemon_main

            setup_logging(args.log_level)
            return daemon_main(p2p_config(args), dht_config(args), metrics=metrics_of(args))
        if args.command == "dht":
            from petald.cli.dht import run as dht_run

            setup_logging(args.log_level)
            return dht_run(
                p2p_config(args),
                args.op,
                args.key,
                args.value,
                args.ttl,
                args.rpc_timeout,
                k=args.dht_k,
            )
        if args.command == "serve":
            from petald.cli.serve import run as serve_run

            setup_logging(args.log_level)
            return serve_run(p2p_config(args), args)
        if args.command == "systemd-unit":
            from petald.cli.systemd import render

            print(render(args, _parser()), end="")
            return 0
        if args.command == "config":
            from petald.cli.config_show import show

            return show(args, parser, read, layers, _parser())
        if args.command == "status":
            from petald.cli.status import run as status_run
            from petald.cli.status import run_web, split_listen

            setup_logging(args.log_level)
            args.listen, web = split_listen(args.listen, web=args.web)
            if web is not None:
                return run_web(p2p_config(args), args.model, web)
            return status_run(
                p2p_config(args), args.model, args.wait, args.json, args.expect_servers
            )
        if args.command == "ping":
            from petald.cli.ping import run as ping_run

            setup_logging(args.log_level)
            return ping_run(
                args.multiaddr, args.count, args.payload_bytes, args.timeout, args.swarm_key
            )
        if args.command == "api":
            from petald.cli.api import run as api_run

            setup_logging(args.log_level)
            return api_run(args)
        if args.command in ("chat", "demo"):
            from petald.cli.chat import run as chat_run
            from petald.cli.demo import run as demo_run

            setup_logging(args.log_level)
            return chat_run(args) if args.command == "chat" else demo_run(args)
    except KeyboardInterrupt:
        return 130
    except ValueError as e:
        print(f"petald: {e}", file=sys.stderr)
        return 2
    except PetaldError as e:
        print(f"petald: {e}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        # trio wraps an error raised in a nursery (e.g. joining a swarm in `status`, `dht`):
        # one such error is still a one-line message, not a traceback.
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        if isinstance(leaf, ValueError):
            print(f"petald: {leaf}", file=sys.stderr)
            return 2
        if isinstance(leaf, PetaldError):
            print(f"petald: {leaf}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
