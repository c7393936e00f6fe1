"""`petald api [MODEL]`: an OpenAI-compatible HTTP API (`petald.api`) over a model whose blocks
run on a swarm. Owns the command's flags and its life: join the swarm named by --initial-peers
(or, without it, start a local swarm of MODEL as `petald chat` does, and stop it on the way out),
load the client's share of the model and the tokenizer, then serve the Starlette app with
hypercorn's trio worker on --listen, print one JSON ready line on stdout once it answers, and
stop cleanly on SIGINT/SIGTERM/SIGHUP (a second signal skips the wait for open requests).

This module stays light to import (argparse wiring); torch, transformers and the app load in
`run`."""

from __future__ import annotations

import argparse
import ipaddress
import json
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from petald.cli.chat import add_model_arguments

DEFAULT_LISTEN = "127.0.0.1:8000"
GRACEFUL_SECONDS = 5.0  # open requests get this long to finish after the first signal
READ_TIMEOUT = 60.0  # seconds a connection may send nothing mid-request (slow clients)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)  # MODEL, --initial-peers, --swarm-key, --model-name, --servers, ...
    p.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"where to answer HTTP (default: {DEFAULT_LISTEN}; port 0: any free port, see "
        "the ready line; another host than loopback exposes the model: set an API key)",
    )
    key = p.add_mutually_exclusive_group()
    key.add_argument(
        "--api-key",
        metavar="KEY",
        help="ask every /v1 request for `Authorization: Bearer KEY` (other users of the machine "
        "can read command lines: prefer --api-key-file)",
    )
    key.add_argument(
        "--api-key-file", type=Path, metavar="FILE", help="the API key, the file's first line"
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=4096,
        help="tokens one request may reach, prompt and answer (default: 4096)",
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=4,
        help="requests generated at once, each in its own inference session (default: 4)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=32,
        help="requests waiting for a turn beyond those; more get HTTP 429 (default: 32)",
    )


@dataclass(frozen=True)
class ApiCommand:
    listen: str
    api_key: str | None
    max_tokens: int
    max_length: int
    max_concurrent: int
    max_queue: int


def api_command(args: argparse.Namespace) -> ApiCommand:
    """The flags, checked before anything starts (ValueError says what to fix)."""
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen {args.listen!r}: give HOST:PORT, e.g. 127.0.0.1:8000")
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be at least 1")
    key = args.api_key
    if args.api_key_file is not None:
        try:
            key = args.api_key_file.read_text().splitlines()[0].strip()
        except (OSError, IndexError, UnicodeDecodeError) as e:
            raise ValueError(
                f"--api-key-file {args.api_key_file}: cannot read a key ({e})"
            ) from None
    if key is not None and not (key.isascii() and key.isprintable() and key and " " not in key):
        raise ValueError("the API key must be printable ASCII without spaces")
    if key is None and not _loopback(host):
        print(
            f"petald api: warning: listening on {host} without an API key: anyone who can "
            "reach it can use the model (--api-key-file FILE)",
            file=sys.stderr,
        )
    return ApiCommand(
        args.listen, key, args.max_new_tokens, args.max_length, args.max_concurrent, args.max_queue
    )


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def run(args: argparse.Namespace) -> int:
    import trio

    from petald.api import EngineConfig
    from petald.cli.chat import conversation_config
    from petald.cli.conversation import Sampling, open_conversation

    command = api_command(args)
    engine_config = EngineConfig(command.max_concurrent, command.max_queue, command.max_length)
    config = conversation_config(args, sampling=Sampling(max_new_tokens=command.max_tokens))
    with open_conversation(config) as chat:
        chat.close()  # the conversation's own session: the API opens one per request
        trio.run(_serve, chat.model, chat.tokenizer, command, engine_config)
    return 0


async def _serve(
    model: object, tokenizer: object, command: ApiCommand, engine_config: object
) -> None:
    import trio
    from hypercorn.config import Config

    from petald.api import AppConfig, Engine, EngineConfig, build_app

    assert isinstance(engine_config, EngineConfig)
    engine = Engine(model, tokenizer, engine_config)
    app = build_app(engine, AppConfig(command.api_key, command.max_tokens))
    http = Config()
    http.bind = [command.listen]
    http.graceful_timeout = GRACEFUL_SECONDS
    http.read_timeout = int(READ_TIMEOUT)
    http.loglevel = "WARNING"
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        nursery.start_soon(_until_signals, stop, nursery.cancel_scope)
        async with trio.open_nursery() as web:
            binds = await _listen(web, app, http, stop)
            url = binds[0] if binds else f"http://{command.listen}"
            ready = {"event": "ready", "url": url, "model": engine.model_name}
            print(json.dumps(ready), flush=True)
            print(f"petald api: {engine.model_name} at {url}/v1", file=sys.stderr, flush=True)
        # hypercorn returned: it stopped listening and gave open requests GRACEFUL_SECONDS;
        # the answers still running stop at their next step.
        nursery.cancel_scope.cancel()


async def _listen(web: Any, app: Any, http: Any, stop: Any) -> list[str]:
    """Starts hypercorn in `web`; returns its URLs once it listens. An address it cannot
    listen on (in use, not ours) is a ValueError, one line: hypercorn raises the OSError
    from inside its nested nurseries, wrapped in exception groups."""
    from functools import partial

    from hypercorn.trio import serve

    try:
        # Any: Starlette's and hypercorn's ASGI type aliases differ, not the protocol.
        return await web.start(partial(serve, app, http, shutdown_trigger=stop.wait))
    except (OSError, BaseExceptionGroup) as e:
        leaf: BaseException = e
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        if not isinstance(leaf, OSError):
            raise
        where = ",".join(http.bind)
        raise ValueError(f"--listen {where}: cannot listen there: {leaf}") from None


async def _until_signals(stop: Any, everything: Any) -> None:
    """The first SIGINT/SIGTERM/SIGHUP stops gracefully, a second one at once."""
    import trio

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for _ in signals:
            if stop.is_set():
                everything.cancel()
                return
            stop.set()
