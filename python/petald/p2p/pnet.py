"""Private swarms: the libp2p private-network ("pnet") pre-shared key, the one seam between
petald and the connection protector.

Key file (the spec, as go-libp2p / kubo write `swarm.key`)::

    /key/swarm/psk/1.0.0/
    /base16/
    <64 hex digits: 32 random bytes>

Protector (the spec): right after TCP, each side sends a random 24-byte nonce and from then on
XORs everything it writes with the XSalsa20 stream of (key, its nonce); it decrypts what it reads
with the peer's nonce. Only then come multistream-select, Noise and yamux, so a peer without the
key (or with another one) never gets to the Noise handshake, let alone a protocol.

Why not py-libp2p's own `psk=` (libp2p.security.pnet): it uses Salsa20 with an 8-byte nonce (not
the spec: no interop with go/rust private networks) and, on a key mismatch, both sides read
garbage as multistream lengths and wait for bytes that never come: the dial hangs until a 30 s
timeout (measured: 4 of 4 mismatched dials). Here both sides check that the first 20 decrypted
bytes are the multistream-select header every libp2p peer sends first, and that the peer's first
bytes are not that header in plaintext (a peer without a key): a mismatch fails in milliseconds
on both sides, with `PnetMismatch`, which `P2PHost` turns into a one-line error (dialer) and a
bounded warning log (listener). A keyless host also watches the first bytes it reads, so that it
too can tell "that peer is in a private swarm" from other failures.

`protect(host, key)` installs it on one host (its swarm's raw-connection upgrades)."""

from __future__ import annotations

import logging
import os
import re
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any

from Crypto.Cipher import Salsa20
from libp2p.abc import IHost
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.peerinfo import PeerInfo

from petald.errors import SwarmKeyMismatch

log = logging.getLogger(__name__)

HEADER = "/key/swarm/psk/1.0.0/"
ENCODING = "/base16/"
KEY_BYTES = 32
NONCE_BYTES = 24
# What every libp2p peer writes first on a new connection (varint length 19, then the id).
MULTISTREAM_HEADER = b"\x13/multistream/1.0.0\n"
# Refused addresses remembered for "log once per address" (oldest forgotten first).
MAX_LOGGED_ADDRS = 256


class PnetMismatch(ConnectionError):
    """The peer at the other end is not in our private swarm (no key, or another key)."""


# Reasons `PnetMismatch` carries.
PEER_HAS_NO_KEY = "the peer has no swarm key"
PEER_HAS_OTHER_KEY = "the peer has another swarm key"
PEER_HAS_A_KEY = "the peer has a swarm key and we have none"


def mismatch_message(addr: str, why: str = PEER_HAS_OTHER_KEY) -> str:
    """The one-line error of the side that tried to connect."""
    if why == PEER_HAS_NO_KEY:
        return f"the peer at {addr} is not in a private swarm (it has no swarm key); we have one"
    return f"the peer at {addr} is in a private swarm: your swarm key is missing or different"


# ---- key files ------------------------------------------------------------------------------


def parse_key(text: str, *, source: str = "swarm key") -> bytes:
    """The 32 key bytes of a key file's text; a one-line ValueError naming what is wrong."""
    lines = [ln.strip() for ln in text.strip().splitlines()]
    if len(lines) != 3:
        raise ValueError(
            f"{source}: expected 3 lines ({HEADER}, {ENCODING}, 64 hex digits), got {len(lines)}"
        )
    if lines[0] != HEADER:
        raise ValueError(f"{source}: first line must be {HEADER}, not {lines[0][:40]!r}")
    if lines[1] != ENCODING:
        raise ValueError(
            f"{source}: only the {ENCODING} encoding is supported, not {lines[1][:40]!r}"
        )
    if not re.fullmatch(r"[0-9a-fA-F]{64}", lines[2]):
        raise ValueError(f"{source}: the key must be 64 hex digits (32 bytes)")
    return bytes.fromhex(lines[2])


def format_key(key: bytes) -> str:
    if len(key) != KEY_BYTES:
        raise ValueError(f"a swarm key is {KEY_BYTES} bytes, not {len(key)}")
    return f"{HEADER}\n{ENCODING}\n{key.hex()}\n"


def load_key(path: Path) -> bytes:
    """The key in file `path`; a one-line ValueError if it is missing or malformed."""
    try:
        text = Path(path).read_text(encoding="ascii")
    except FileNotFoundError:
        raise ValueError(f"swarm key file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"swarm key file {path}: cannot read it ({e})") from None
    return parse_key(text, source=f"swarm key file {path}")


def write_new_key(path: Path) -> None:
    """Writes a fresh random key to `path` (mode 0600); refuses to overwrite a file."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ValueError(f"{path} exists; not overwriting a swarm key") from None
    with os.fdopen(fd, "w") as f:
        f.write(format_key(os.urandom(KEY_BYTES)))


# ---- XSalsa20 -------------------------------------------------------------------------------


def _rotl(v: int, c: int) -> int:
    return ((v << c) & 0xFFFFFFFF) | (v >> (32 - c))


def hsalsa20(key: bytes, nonce16: bytes) -> bytes:
    """HSalsa20 (the XSalsa20 subkey derivation): 20 Salsa20 rounds, no final addition."""
    c = struct.unpack("<4I", b"expand 32-byte k")
    k = struct.unpack("<8I", key)
    n = struct.unpack("<4I", nonce16)
    x = [c[0], *k[:4], c[1], *n, c[2], *k[4:], c[3]]
    for _ in range(10):
        for a, b, cc, d in ((0, 4, 8, 12), (5, 9, 13, 1), (10, 14, 2, 6), (15, 3, 7, 11)):
            x[b] ^= _rotl((x[a] + x[d]) & 0xFFFFFFFF, 7)
            x[cc] ^= _rotl((x[b] + x[a]) & 0xFFFFFFFF, 9)
            x[d] ^= _rotl((x[cc] + x[b]) & 0xFFFFFFFF, 13)
            x[a] ^= _rotl((x[d] + x[cc]) & 0xFFFFFFFF, 18)
        for a, b, cc, d in ((0, 1, 2, 3), (5, 6, 7, 4), (10, 11, 8, 9), (15, 12, 13, 14)):
            x[b] ^= _rotl((x[a] + x[d]) & 0xFFFFFFFF, 7)
            x[cc] ^= _rotl((x[b] + x[a]) & 0xFFFFFFFF, 9)
            x[d] ^= _rotl((x[cc] + x[b]) & 0xFFFFFFFF, 13)
            x[a] ^= _rotl((x[d] + x[cc]) & 0xFFFFFFFF, 18)
    return struct.pack("<8I", x[0], x[5], x[10], x[15], x[6], x[7], x[8], x[9])


def xsalsa20(key: bytes, nonce: bytes) -> Any:
    """A streaming XSalsa20 cipher (`.encrypt(data)` XORs the next bytes of the stream)."""
    return Salsa20.new(key=hsalsa20(key, nonce[:16]), nonce=nonce[16:])


# ---- the protected connection ---------------------------------------------------------------


class PnetConn(RawConnection):
    """`conn` with the pnet protector (`key` given), or only watched (`key` None): either way a
    peer whose first bytes show it is on the other side of a swarm-key boundary raises
    `PnetMismatch` on the first read."""

    def __init__(self, conn: Any, key: bytes | None) -> None:  # no super(): a pure wrapper
        self._conn = conn
        self._key = key
        self._write_cipher: Any = None
        self._read_cipher: Any = None
        self._checked = b""  # plaintext compared with MULTISTREAM_HEADER so far

    def __getattr__(self, name: str) -> Any:  # is_initiator, transport addresses, ...
        return getattr(self.__dict__["_conn"], name)

    async def write(self, data: bytes) -> None:
        if self._key is None:
            await self._conn.write(data)
            return
        prefix = b""
        if self._write_cipher is None:
            prefix = os.urandom(NONCE_BYTES)
            self._write_cipher = xsalsa20(self._key, prefix)
        await self._conn.write(prefix + self._write_cipher.encrypt(data))

    async def _read_raw(self, n: int | None) -> bytes:
        # The end of the stream is no mismatch (a peer at its connection limit hangs up too).
        data: bytes = await self._conn.read(n)
        return data

    def _check(self, plain: bytes, *, what: str) -> None:
        """Compares the start of what the peer sent with the multistream header."""
        need = len(MULTISTREAM_HEADER) - len(self._checked)
        if need <= 0:
            return
        self._checked += plain[:need]
        if not MULTISTREAM_HEADER.startswith(self._checked):
            raise PnetMismatch(what)

    async def read(self, n: int | None = None) -> bytes:
        if self._key is None:
            data = await self._read_raw(n)
            self._check(data, what=PEER_HAS_A_KEY)
            return data
        if self._read_cipher is None:
            nonce = b""
            while len(nonce) < NONCE_BYTES:
                chunk = await self._read_raw(NONCE_BYTES - len(nonce))
                if not chunk:
                    return b""
                nonce += chunk
                if nonce[:20] == MULTISTREAM_HEADER:  # plaintext libp2p: the peer has no key
                    raise PnetMismatch(PEER_HAS_NO_KEY)
            self._read_cipher = xsalsa20(self._key, nonce)
        plain = self._read_cipher.decrypt(await self._read_raw(n))
        self._check(plain, what=PEER_HAS_OTHER_KEY)
        return plain

    async def close(self) -> None:
        await self._conn.close()

    def get_remote_address(self) -> tuple[str, int] | None:
        return self._conn.get_remote_address()


def _addr_of(conn: Any) -> str:
    try:
        ip, port = conn.get_remote_address()
        return f"{ip}:{port}"
    except Exception:
        return "?"


class Protector:
    """Installed on one host by `protect`; remembers what it refused, for errors and logs."""

    def __init__(self, key: bytes | None) -> None:
        self.key = key
        self.refused_dials: OrderedDict[str, str] = OrderedDict()  # peer id -> why
        self._logged: OrderedDict[str, None] = OrderedDict()
        self.refused_inbound = 0

    def _remember(self, table: OrderedDict[str, Any], key: str, value: Any) -> bool:
        new = key not in table
        table[key] = value
        table.move_to_end(key)
        while len(table) > MAX_LOGGED_ADDRS:
            table.popitem(last=False)
        return new

    def refused_inbound_from(self, addr: str, why: str) -> None:
        self.refused_inbound += 1
        # Once per address (IP: ports are ephemeral) and reason: a peer that keeps retrying
        # does not flood the log; at most MAX_LOGGED_ADDRS remembered.
        if self._remember(self._logged, f"{addr.rsplit(':', 1)[0]} {why}", None):
            log.warning("refused a connection from %s: swarm key mismatch (%s)", addr, why)


def protect(host: IHost, key: bytes | None) -> Protector:
    """Wraps every raw connection of `host` (dialled, accepted, relayed) in `PnetConn` before
    the security handshake. With `key` None the connections are only watched."""
    swarm: Any = host.get_network()
    protector = Protector(key)
    upgrade_out, upgrade_in = swarm.upgrade_outbound_raw_conn, swarm.upgrade_inbound_raw_conn

    async def outbound(raw_conn: Any, peer_id: Any, *args: Any, **kw: Any) -> Any:
        conn = PnetConn(raw_conn, key)
        try:
            return await upgrade_out(conn, peer_id, *args, **kw)
        except Exception as e:
            why = _find_mismatch(e)
            if why is not None:
                protector._remember(protector.refused_dials, str(peer_id), why)
            raise

    async def inbound(raw_conn: Any, maddr: Any) -> Any:
        conn = PnetConn(raw_conn, key)
        try:
            return await upgrade_in(conn, maddr)
        except Exception as e:
            why = _find_mismatch(e)
            if why is not None:
                protector.refused_inbound_from(_addr_of(raw_conn), why)
            raise

    swarm.upgrade_outbound_raw_conn = outbound
    swarm.upgrade_inbound_raw_conn = inbound
    swarm.petald_pnet = protector
    return protector


def refusal_error(host: IHost, peer: PeerInfo) -> SwarmKeyMismatch | None:
    """After a failed dial of `peer` by `host`: the one-line error to raise if the dial failed
    on a swarm key mismatch (then forgotten), else None."""
    protector: Protector | None = getattr(host.get_network(), "petald_pnet", None)
    why = protector.refused_dials.pop(str(peer.peer_id), None) if protector else None
    if why is None:
        return None
    # The transport address (the peer id is the peer's, not its address; callers pass both).
    addr = str(peer.addrs[0]).split("/p2p/")[0] if peer.addrs else str(peer.peer_id)
    return SwarmKeyMismatch(mismatch_message(addr, why), peer=str(peer.peer_id))


def _find_mismatch(e: BaseException | None, depth: int = 0) -> str | None:
    """The reason of a `PnetMismatch` in `e`'s causes, contexts or group members."""
    seen = 0
    while e is not None and seen < 32 and depth < 8:
        if isinstance(e, PnetMismatch):
            return str(e)
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                found = _find_mismatch(sub, depth + 1)
                if found is not None:
                    return found
        e = e.__cause__ or e.__context__
        seen += 1
    return None
