"""The `petald` command. Each subcommand parses its flags into a config and runs; errors in
user input exit with status 2 and a one-line message, never a traceback."""

from __future__ import annotations

import argparse
import sys

from petald import __version__


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "core-demo":
            from petald.cli.core_demo import run

            return run(seed=args.seed)
    except KeyboardInterrupt:
        return 130
    except ValueError as e:
        print(f"petald: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
