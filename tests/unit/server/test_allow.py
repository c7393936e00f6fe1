"""`--allow-peers` (petald.server.allow): parsing, and which protocols the list guards for whom.
The refusal on the wire is in tests/swarm/test_private_swarm.py::test_allow_peers."""

from __future__ import annotations

from pathlib import Path

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from petald.server.allow import AllowListHost, parse_allow_peers
from petald.wire.protocols import (
    BACKWARD_PROTOCOL,
    FORWARD_PROTOCOL,
    INFERENCE_PROTOCOL,
    INFO_PROTOCOL,
    PUSH_PROTOCOL,
)


def _id() -> str:
    return ID.from_pubkey(create_new_key_pair().public_key).to_base58()


class _Host:
    """Just what AllowListHost uses of a libp2p host: its id and handler registration."""

    def __init__(self) -> None:
        self.me = ID.from_pubkey(create_new_key_pair().public_key)
        self.handlers: dict[str, object] = {}

    def get_id(self) -> ID:
        return self.me

    def set_stream_handler(self, protocol: str, handler: object) -> None:
        self.handlers[protocol] = handler


def test_parse_ids_and_files(tmp_path: Path) -> None:
    """Catches: a comma list or a file with comments read wrongly, a bad id accepted."""
    a, b = _id(), _id()
    assert parse_allow_peers(f"{a},{b}") == {a, b}
    (tmp_path / "ids").write_text(f"# clients\n{a}  # alice\n\n{b}\n")
    assert parse_allow_peers(str(tmp_path / "ids")) == {a, b}
    with pytest.raises(ValueError, match="'nope' is not a peer id") as e:
        parse_allow_peers(f"{a},nope")
    assert "\n" not in str(e.value)
    (tmp_path / "empty").write_text("# nobody\n")
    with pytest.raises(ValueError, match="no peer id"):
        parse_allow_peers(str(tmp_path / "empty"))


def test_who_is_allowed_what() -> None:
    """Listed clients and ourselves: every block RPC. Announced servers: pushes only (a server
    of the swarm is no client of ours). Anyone else: nothing. Other protocols pass unguarded.
    Catches: servers let in to open sessions, pushes between servers refused, the list
    applied to the DHT or gossip."""
    listed, server, stranger = _id(), _id(), _id()
    host = _Host()
    guarded = AllowListHost(host, {listed}, is_server=lambda p: p == server)  # type: ignore[arg-type]
    me = host.me.to_base58()
    for protocol in (INFO_PROTOCOL, FORWARD_PROTOCOL, BACKWARD_PROTOCOL, INFERENCE_PROTOCOL):
        assert guarded.allows(protocol, listed) and guarded.allows(protocol, me)
        assert not guarded.allows(protocol, server)
        assert not guarded.allows(protocol, stranger)
    assert guarded.allows(PUSH_PROTOCOL, server) and guarded.allows(PUSH_PROTOCOL, listed)
    assert not guarded.allows(PUSH_PROTOCOL, stranger)

    async def kad(stream: object) -> None: ...

    guarded.set_stream_handler("/ipfs/kad/1.0.0", kad)  # type: ignore[arg-type]
    guarded.set_stream_handler(INFO_PROTOCOL, kad)  # type: ignore[arg-type]
    assert host.handlers["/ipfs/kad/1.0.0"] is kad
    assert host.handlers[INFO_PROTOCOL] is not kad
