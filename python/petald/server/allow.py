"""`petald serve --allow-peers`: a server that serves only named clients.

What the list covers, and why: the swarm key (petald.p2p.pnet) decides who may connect at all;
the allow list decides whose block RPCs a server answers. It applies to the block RPC protocols
only — info, forward, backward and inference from peers not on the list get the refusal
`{"error": "not_allowed", "message": ...}` (the client raises it with its message) — and not to
the swarm's own protocols (identify, DHT, gossip, dial-back, relay), so servers and bootstrap
nodes still find and reach each other. Pushes (one server sending its output to the next server
of a client's session) come from servers, not clients: a push is also accepted from a peer whose
signed announcement is in our swarm view. That opens no session: a push only feeds a session an
allowed client opened, and names it by the 16 random bytes of its token.

Entry point: `AllowListHost(host, allowed, is_server)`, given to the handlers' `register` in
place of the host."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from petald.wire.messages import write_message

if TYPE_CHECKING:
    from libp2p.abc import IHost, INetStream
    from libp2p.custom_types import TProtocol
from petald.wire.protocols import (
    BACKWARD_PROTOCOL,
    FORWARD_PROTOCOL,
    INFERENCE_PROTOCOL,
    INFO_PROTOCOL,
    PUSH_PROTOCOL,
)

log = logging.getLogger(__name__)

CLIENT_PROTOCOLS = frozenset(
    {INFO_PROTOCOL, FORWARD_PROTOCOL, BACKWARD_PROTOCOL, INFERENCE_PROTOCOL}
)
# Seconds to write the refusal: a peer that does not read it costs no more than that.
REFUSAL_TIMEOUT = 5.0
MAX_LOGGED_PEERS = 256


def parse_allow_peers(value: str) -> frozenset[str]:
    """`PEER_ID[,PEER_ID...]`, or a file of peer ids (one or more a line, `#` comments); a
    one-line ValueError naming the first bad id."""
    path = Path(value)
    if path.is_file():
        text = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
        source = f"--allow-peers file {path}"
    else:
        text, source = value, "--allow-peers"
    ids = [t for t in re.split(r"[\s,]+", text) if t]
    if not ids:
        raise ValueError(f"{source}: no peer id")
    for t in ids:
        if not is_peer_id(t):
            raise ValueError(f"{source}: {t[:60]!r} is not a peer id (e.g. 12D3KooW...)")
    return frozenset(ids)


def is_peer_id(text: str) -> bool:
    """A base58 multihash as libp2p peer ids are: sha256 (Qm...) or identity (12D3KooW...).
    (`ID.from_base58` takes any base58 text, e.g. "nope".)"""
    # Imported here: `petald serve` parses its flags (this) before it spawns its compute
    # process, and py-libp2p's import (seconds) must come after that spawn.
    from libp2p.peer.id import ID

    try:
        raw = ID.from_base58(text).to_bytes()
    except Exception:
        return False
    sha256 = len(raw) == 34 and raw[:2] == b"\x12\x20"
    identity = len(raw) >= 2 and raw[0] == 0 and len(raw) == raw[1] + 2
    return sha256 or identity


def refusal(peer: str) -> dict[str, Any]:
    return {
        "error": "not_allowed",
        "message": f"this server serves only the peers on its allow list (--allow-peers), and "
        f"{peer} is not on it: ask its operator to add your peer id",
    }


class AllowListHost:
    """`host`, except that the handlers registered through it for the block RPC protocols
    answer only allowed peers (see the module docstring)."""

    def __init__(
        self, host: IHost, allowed: Iterable[str], is_server: Callable[[str], bool]
    ) -> None:
        self._host = host
        self.allowed = frozenset(allowed) | {host.get_id().to_base58()}
        self._is_server = is_server
        self._logged: dict[str, None] = {}
        self.refused = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._host, name)

    def allows(self, protocol: TProtocol, peer: str) -> bool:
        if peer in self.allowed:
            return True
        return protocol == PUSH_PROTOCOL and self._is_server(peer)

    def set_stream_handler(
        self, protocol: TProtocol, handler: Callable[[INetStream], Awaitable[None]]
    ) -> None:
        if protocol not in CLIENT_PROTOCOLS and protocol != PUSH_PROTOCOL:
            self._host.set_stream_handler(protocol, handler)
            return

        async def guarded(stream: INetStream) -> None:
            peer = stream.muxed_conn.peer_id.to_base58()
            if self.allows(protocol, peer):
                await handler(stream)
                return
            self._refuse_log(peer, protocol)
            with trio.move_on_after(REFUSAL_TIMEOUT):
                try:
                    await write_message(stream, refusal(peer))
                    await stream.close()
                except Exception as e:  # the peer went away: nothing to tell it
                    log.debug("refusal to %s not delivered: %s", peer, e)

        self._host.set_stream_handler(protocol, guarded)

    def _refuse_log(self, peer: str, protocol: str) -> None:
        self.refused += 1
        if peer in self._logged:  # once per peer, bounded
            return
        if len(self._logged) >= MAX_LOGGED_PEERS:
            self._logged.pop(next(iter(self._logged)))
        self._logged[peer] = None
        log.warning("refused %s from %s: not on the allow list (--allow-peers)", protocol, peer)
