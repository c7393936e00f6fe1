"""The private-swarm seam (petald.p2p.pnet): the key file format, `petald swarm-key new`, the
XSalsa20 stream against libsodium's, and two in-process hosts over loopback for every pairing of
keys (same, none/key, key/none, different): the dial fails fast with the one-line error, the
accepting side counts the refusal, and with the same key (or none on both sides) it connects."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import multiaddr
import nacl.bindings
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.peerinfo import info_from_p2p_addr

from petald.cli import main
from petald.errors import SwarmKeyMismatch
from petald.p2p.config import P2PConfig
from petald.p2p.host import P2PHost
from petald.p2p.pnet import format_key, load_key, parse_key, write_new_key, xsalsa20

GOOD = "/key/swarm/psk/1.0.0/\n/base16/\n" + "ab" * 32 + "\n"


def test_key_file_format() -> None:
    """Catches: a parser that accepts another header, encoding or key length, or reads the hex
    wrongly (round trip through format_key)."""
    assert parse_key(GOOD) == bytes([0xAB]) * 32
    assert parse_key(format_key(bytes(range(32)))) == bytes(range(32))
    bad = {
        "/key/swarm/psk/2.0.0/\n/base16/\n" + "ab" * 32: "first line must be",
        "/key/swarm/psk/1.0.0/\n/base64/\n" + "ab" * 32: "only the /base16/ encoding",
        "/key/swarm/psk/1.0.0/\n/base16/\n" + "ab" * 31: "64 hex digits",
        "/key/swarm/psk/1.0.0/\n/base16/\n" + "zz" * 32: "64 hex digits",
        "ab" * 32: "expected 3 lines",
        "": "expected 3 lines",
    }
    for text, words in bad.items():
        with pytest.raises(ValueError, match=words) as e:
            parse_key(text)
        assert "\n" not in str(e.value)


def test_load_key_errors_are_one_line(tmp_path: Path) -> None:
    """Catches: a missing or binary key file surfacing as a traceback-worthy OSError."""
    with pytest.raises(ValueError, match="does not exist"):
        load_key(tmp_path / "nope")
    (tmp_path / "bin").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="cannot read"):
        load_key(tmp_path / "bin")
    with pytest.raises(ValueError, match="swarm key file"):
        P2PConfig(new_swarm=True, swarm_key=tmp_path / "nope")


def test_swarm_key_new(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`petald swarm-key new FILE`: mode 0600, a valid random key, and no overwrite.
    Catches: a key file created with the umask's mode (0644), or overwritten."""
    path = tmp_path / "swarm.key"
    assert main(["swarm-key", "new", str(path)]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = load_key(path)
    assert len(key) == 32
    assert main(["swarm-key", "new", str(path)]) == 2
    assert "exists; not overwriting" in capsys.readouterr().err
    assert load_key(path) == key
    write_new_key(tmp_path / "other.key")
    assert load_key(tmp_path / "other.key") != key


def test_xsalsa20_is_libsodiums() -> None:
    """The stream is the spec's XSalsa20: libsodium's secretbox XORs a message with the same
    stream from byte 32 on. Catches: a wrong HSalsa20 round or word order, Salsa20 with the
    nonce cut to 8 bytes (py-libp2p's protector), a stream that restarts on each call."""
    for n in (1, 63, 64, 65, 1000):
        key, nonce = os.urandom(32), os.urandom(24)
        box = nacl.bindings.crypto_secretbox(bytes(n), nonce, key)[16:]
        cipher = xsalsa20(key, nonce)
        stream = cipher.encrypt(bytes(7)) + cipher.encrypt(bytes(n + 25))
        assert stream[32:] == box


def _host(key: Path | None) -> P2PHost:
    config = P2PConfig(listen=("/ip4/127.0.0.1/tcp/0",), new_swarm=True, swarm_key=key)
    return P2PHost(create_new_key_pair(), config)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    write_new_key(tmp_path / "a.key")
    write_new_key(tmp_path / "b.key")
    return tmp_path / "a.key", tmp_path / "b.key"


@pytest.mark.parametrize(
    ("dialer", "listener", "words"),
    [
        ("a", "a", None),
        (None, None, None),
        (None, "a", "is in a private swarm: your swarm key is missing or different"),
        ("a", None, "is not in a private swarm (it has no swarm key); we have one"),
        ("a", "b", "is in a private swarm: your swarm key is missing or different"),
    ],
)
async def test_hosts(
    keys: tuple[Path, Path], dialer: str | None, listener: str | None, words: str | None
) -> None:
    """Catches: a protector that lets a keyless or wrong-key peer through (the ping stream
    would open), one that hangs on a mismatch instead of failing at once (4 s bound; py-libp2p's
    own takes up to 30 s), a mismatch reported as a plain unreachable peer, and an accepting
    side that does not notice the refused connection."""
    by_name = {"a": keys[0], "b": keys[1], None: None}
    a, b = _host(by_name[dialer]), _host(by_name[listener])
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)
        peer = info_from_p2p_addr(multiaddr.Multiaddr(b.addrs()[0]))
        if words is None:
            await a.connect(peer, timeout=4)
            stream = await a.host.new_stream(peer.peer_id, ["/ipfs/ping/1.0.0"])
            await stream.reset()
            assert b.pnet.refused_inbound == 0
        else:
            with pytest.raises(SwarmKeyMismatch) as e:
                await a.connect(peer, timeout=4)
            assert str(e.value) == f"the peer at {peer.addrs[0]} {words}"
            assert b.pnet.refused_inbound >= 1
            assert a.host.get_network().get_connections(peer.peer_id) == []
        nursery.cancel_scope.cancel()
