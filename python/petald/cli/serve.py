"""`petald serve MODEL --blocks START:END` (or `--num-blocks N`): join the swarm as a daemon,
load that span of MODEL (a model directory, a .gguf file or a Hub id) in a compute process,
answer the block RPCs and announce the span (petald.server.service). The JSON ready line is
printed once the server is online; the first SIGTERM/SIGINT drains, a second one stops at once.

This module stays light to import (argparse wiring); the daemon and torch load in `run`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from petald.server.allow import parse_allow_peers
from petald.server.serve_config import ServeConfig, worker_spec
from petald.types import BlockRange

if TYPE_CHECKING:
    from petald.metrics import Metrics

QUANT_MODES = ("none", "int8", "nf4")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="model directory, .gguf file or Hub id")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--blocks", metavar="START:END", help="serve these blocks, e.g. 20:40")
    where.add_argument(
        "--num-blocks",
        type=int,
        metavar="N",
        help="serve the N consecutive blocks the swarm serves least, and move when the swarm "
        "becomes badly unbalanced",
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument(
        "--quant", default="none", choices=QUANT_MODES, help="quantize the linear layers"
    )
    p.add_argument(
        "--adapters",
        nargs="+",
        default=[],
        metavar="DIR",
        help="LoRA adapters (peft directories, safetensors) that clients may select by name "
        "(the directory name) per request",
    )
    p.add_argument("--model-name", help="announce under this name (default: from MODEL)")
    p.add_argument("--public-name", default="", help="a name shown in `petald status`")
    p.add_argument(
        "--cache-tokens",
        type=int,
        help="KV-cache budget in tokens across sessions (default: a quarter of free memory)",
    )
    p.add_argument(
        "--throughput",
        default="auto",
        help="tokens/s to announce; 'auto' measures once and caches it, 'eval' measures again",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="seconds active sessions get to finish on SIGTERM or a move (default: 60)",
    )
    p.add_argument(
        "--allow-peers",
        metavar="PEER_ID[,..]|FILE",
        help="answer block requests only from these clients (peer ids, comma-separated, or a "
        "file of them); other servers of the swarm still push to us (petald.server.allow)",
    )
    add_metrics_arg(p)
    p.add_argument(
        "--rebalance-period",
        type=float,
        default=600.0,
        help="with --num-blocks: seconds between balance checks (0: never move)",
    )


def add_metrics_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (off by default; port 0: "
        "any free port, the ready line says which; 127.0.0.1 keeps them on this machine)",
    )


def metrics_of(args: argparse.Namespace) -> Metrics | None:
    """The daemon's `Metrics` for `--metrics HOST:PORT` (None without it)."""
    if args.metrics is None:
        return None
    from petald.metrics import Metrics
    from petald.web.http import HttpAddress

    return Metrics(HttpAddress.parse(args.metrics, flag="--metrics"))


def model_name(source: str) -> str:
    """The name a model is announced under: a Hub id as given, else the file or directory name
    (without .gguf), so every server of the same checkpoint agrees."""
    path = Path(source)
    if path.exists():
        return path.stem if path.suffix == ".gguf" else path.resolve().name
    return source


def serve_config(args: argparse.Namespace) -> ServeConfig:

    if args.cache_tokens is not None and args.cache_tokens < 1:
        raise ValueError("--cache-tokens must be positive")
    if args.num_blocks is not None and args.num_blocks < 1:
        raise ValueError("--num-blocks must be positive")
    if args.throughput not in ("auto", "eval"):
        try:
            ok = float(args.throughput) > 0
        except ValueError:
            ok = False
        if not ok:
            raise ValueError("--throughput must be auto, eval or a positive number of tokens/s")
    for directory in args.adapters:
        if not (Path(directory) / "adapter_model.safetensors").is_file():
            raise ValueError(f"--adapters {directory}: no adapter_model.safetensors there")
    if len({Path(d).name for d in args.adapters}) != len(args.adapters):
        raise ValueError("--adapters: two adapters have the same directory name")
    if args.drain_timeout < 0:
        raise ValueError("--drain-timeout must be >= 0")
    return ServeConfig(
        source=args.model,
        model=args.model_name or model_name(args.model),
        blocks=BlockRange.parse(args.blocks) if args.blocks else None,
        num_blocks=args.num_blocks,
        dtype=args.dtype,
        device=args.device,
        quant=args.quant,
        adapters=tuple(str(Path(d).resolve()) for d in args.adapters),
        cache_tokens=args.cache_tokens,
        throughput=args.throughput,
        drain_timeout=args.drain_timeout,
        rebalance_period=args.rebalance_period,
        public_name=args.public_name,
        allow_peers=parse_allow_peers(args.allow_peers) if args.allow_peers else None,
    )


def run(p2p, args: argparse.Namespace) -> int:
    from petald.notify import notifier
    from petald.server.executor import spawn_worker
    from petald.server.startup import stamp

    config = serve_config(args)
    metrics = metrics_of(args)
    # Under systemd: the compute process reports its loading progress to us (petald.notify).
    notifier().relay_children()
    # With --blocks the span is known now: the compute process imports torch and loads it
    # while this process imports py-libp2p and joins the swarm (both take seconds).
    worker = spawn_worker(worker_spec(config, config.blocks)) if config.blocks else None
    try:
        import trio

        from petald.daemon import main as daemon_main
        from petald.server.service import BlockServer
        from petald.stack import Stack

        stamp("daemon.imported")
        server: list[BlockServer] = []

        async def on_started(stack: Stack, reachability: str, nursery: trio.Nursery) -> None:
            server.append(BlockServer(config, stack, reachability, worker, metrics))
            await nursery.start(server[0].run)

        async def on_drain() -> None:
            if server:
                await server[0].drain()

        return daemon_main(p2p, on_started=on_started, on_drain=on_drain, metrics=metrics)
    finally:
        if worker is not None:
            worker.close()  # stopped already if it served; not if the daemon never got to it
