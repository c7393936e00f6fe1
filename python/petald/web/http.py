"""`serve_asgi(app, address)`: one ASGI app served over HTTP/1.1 by hypercorn's trio worker,
inside the caller's trio loop (a service: `url = await nursery.start(serve_asgi, app, address)`;
cancellation stops it). `HttpAddress.parse("HOST:PORT")` checks what users type for
`--listen`/`--metrics`.

Why hypercorn in-loop rather than a thread (e.g. prometheus_client's `start_http_server`): the
pages read state that lives on the trio loop (the swarm view, handlers' counters); answering
from the loop itself reads it between two awaits, never half-updated, with no locks."""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Any

import trio

log = logging.getLogger(__name__)

# Seconds open connections get to finish when the server is cancelled.
GRACEFUL_TIMEOUT = 1.0
# Request bodies the apps accept: they only serve GETs; anything bigger is refused early.
MAX_BODY_BYTES = 64 * 1024


@dataclass(frozen=True)
class HttpAddress:
    host: str
    port: int
    flag: str = "--listen"  # the flag it came from, for error messages

    @classmethod
    def parse(cls, text: str, *, flag: str = "--listen") -> HttpAddress:
        """`HOST:PORT` (`[::1]:PORT` for IPv6; port 0: any free one) or a one-line ValueError."""
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{flag} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8001")
        bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            ipaddress.ip_address(bare)
        except ValueError:
            if bare != "localhost":
                raise ValueError(
                    f"{flag} {text!r}: HOST must be an IP address (127.0.0.1, 0.0.0.0, [::1]) "
                    "or localhost"
                ) from None
        return cls(bare, int(port), flag)

    def bind(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


async def serve_asgi(
    app: Any, address: HttpAddress, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serves `app` until cancelled; `started(url)` once listening, with the port bound (port 0
    resolved). Raises ValueError (e.g. address in use) before `started`."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [address.bind()]
    config.accesslog = None
    config.errorlog = logging.getLogger("petald.web.hypercorn")
    config.graceful_timeout = GRACEFUL_TIMEOUT
    config.wsgi_max_body_size = MAX_BODY_BYTES
    # hypercorn's own banner ("Running on ...") is info; our caller logs or prints the URL.
    logging.getLogger("petald.web.hypercorn").setLevel(logging.WARNING)

    async def run_hypercorn(*, task_status: trio.TaskStatus[list[str]]) -> None:
        await serve(app, config, task_status=task_status)

    async with trio.open_nursery() as nursery:
        try:
            binds: list[str] = await nursery.start(run_hypercorn)
        except* OSError as group:  # in use, not ours to bind: the user's to fix
            e: BaseException = group
            while isinstance(e, BaseExceptionGroup):  # hypercorn's nurseries nest it
                e = e.exceptions[0]
            raise ValueError(f"{address.flag} {address.bind()}: cannot listen there: {e}") from None
        url = binds[0].rstrip("/")
        log.info("HTTP on %s", url)
        task_status.started(url)
