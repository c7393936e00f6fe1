"""Kademlia DHT messages on a stream (protocol `/petald/kad/1.0.0`, proto/petald/v1/kad.proto):
the typed values `KadMessage`, `PeerRecord` and `DhtRecord`, and their framing as in the libp2p
kad-dht spec, an unsigned-varint length prefix then the protobuf bytes. Entry points:
`encode_message(msg)` for the sender and `await read_message(stream)` for the receiver.

Everything a peer sends is validated here, once: the length before anything is read, the
protobuf, enum values, counts and sizes. Any violation raises `MessageError`; nothing is read or
allocated beyond `max_size` whatever the prefix claims. Local values are held to the same limits
(checked when constructed), so petald never sends what it would itself reject."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from google.protobuf.message import DecodeError

from petald.errors import MessageError
from petald.wire.pb import kad_pb2 as pb

__all__ = [
    "MAX_ADDRS_PER_PEER",
    "MAX_ADDR_BYTES",
    "MAX_CLOSER_PEERS",
    "MAX_KEY_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_PEER_ID_BYTES",
    "MAX_PROVIDER_PEERS",
    "MAX_RECORD_VALUE_BYTES",
    "MAX_TIME_RECEIVED_CHARS",
    "PROTOCOL_ID",
    "ConnectionType",
    "DhtRecord",
    "KadMessage",
    "MessageType",
    "PeerRecord",
    "decode_message",
    "encode_message",
    "read_message",
]

PROTOCOL_ID = "/petald/kad/1.0.0"

# One message, prefix excluded. 20 closer peers with a few addresses each take ~4 KiB; the
# rest is a GET answer's record value (a GET answer cuts its bundle to what fits beside its
# closer peers). It also bounds what a peer makes us buffer and parse per message (go-libp2p
# allows 4 MiB).
MAX_MESSAGE_BYTES = 256 * 1024
# k in the kad-dht spec ("Replication parameter"): an honest peer never returns more closer
# peers than k. More is a protocol violation and is rejected, not truncated, so a hostile peer
# cannot choose which of its entries survive.
MAX_CLOSER_PEERS = 20
# Providers returned by GET_PROVIDERS; the same bound as k, for the same reason.
MAX_PROVIDER_PEERS = 20
# A peer dual-stacked on TCP, QUIC and a relay advertises ~10 addresses; 16 leaves headroom.
MAX_ADDRS_PER_PEER = 16
# One binary multiaddr: a 253-byte DNS name plus protocol codes, port and /p2p/<id> fits.
MAX_ADDR_BYTES = 512
# A multihash of a public key: 38 bytes for Ed25519 (identity), 34 for SHA-256; 128 is generous.
MAX_PEER_ID_BYTES = 128
# DHT keys are petald names ("/petald/..."), SHA-256 digests or peer ids: short by design.
MAX_KEY_BYTES = 256
# The protobuf record's value: one signed record in a PUT (at most petald.dht.records'
# MAX_RECORD_BYTES), every publisher's records under a key, bundled, in a GET answer. At 16 KiB
# (~40 announcements) and then 56 KiB (~140), readers of a model with more servers got samples:
# issue 12's simulation had views 96 % complete with 105 servers, and 300 servers placing
# themselves through the DHT piled up on blocks they could not see served (max/min 5.3 servers
# per block). 224 KiB holds ~550 announcements.
MAX_RECORD_VALUE_BYTES = 224 * 1024
# RFC 3339 timestamps are ~35 characters.
MAX_TIME_RECEIVED_CHARS = 64


class ByteStream(Protocol):
    """What `read_message` needs: py-libp2p's `INetStream` fits (it may return fewer bytes)."""

    async def read(self, n: int) -> bytes: ...


class MessageType(enum.IntEnum):
    PUT_VALUE = pb.Message.PUT_VALUE
    GET_VALUE = pb.Message.GET_VALUE
    ADD_PROVIDER = pb.Message.ADD_PROVIDER
    GET_PROVIDERS = pb.Message.GET_PROVIDERS
    FIND_NODE = pb.Message.FIND_NODE
    PING = pb.Message.PING


class ConnectionType(enum.IntEnum):
    NOT_CONNECTED = pb.Message.NOT_CONNECTED
    CONNECTED = pb.Message.CONNECTED
    CAN_CONNECT = pb.Message.CAN_CONNECT
    CANNOT_CONNECT = pb.Message.CANNOT_CONNECT


def _check_bytes(what: str, value: object, max_len: int, *, allow_empty: bool = True) -> None:
    if not isinstance(value, bytes):
        raise MessageError(f"{what} must be bytes, not {type(value).__name__}")
    if len(value) > max_len:
        raise MessageError(f"{what} is {len(value)} bytes, more than {max_len}")
    if not allow_empty and not value:
        raise MessageError(f"{what} is empty")


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """A peer as the DHT names it: its id (multihash bytes) and binary multiaddrs."""

    peer_id: bytes
    addrs: tuple[bytes, ...] = ()
    connection: ConnectionType = ConnectionType.NOT_CONNECTED

    def __post_init__(self) -> None:
        _check_bytes("peer id", self.peer_id, MAX_PEER_ID_BYTES, allow_empty=False)
        if len(self.addrs) > MAX_ADDRS_PER_PEER:
            raise MessageError(
                f"{len(self.addrs)} addresses for a peer, more than {MAX_ADDRS_PER_PEER}"
            )
        for addr in self.addrs:
            _check_bytes("multiaddr", addr, MAX_ADDR_BYTES, allow_empty=False)


@dataclass(frozen=True, slots=True)
class DhtRecord:
    """The protobuf `Record`: `value` is opaque here (petald.dht.records signs and checks it)."""

    key: bytes
    value: bytes
    time_received: str = ""

    def __post_init__(self) -> None:
        _check_bytes("record key", self.key, MAX_KEY_BYTES, allow_empty=False)
        _check_bytes("record value", self.value, MAX_RECORD_VALUE_BYTES)
        if len(self.time_received) > MAX_TIME_RECEIVED_CHARS:
            raise MessageError(f"timeReceived longer than {MAX_TIME_RECEIVED_CHARS} characters")


@dataclass(frozen=True, slots=True)
class KadMessage:
    """One DHT request or response (the spec uses the same message and type for both)."""

    type: MessageType
    key: bytes = b""
    record: DhtRecord | None = None
    closer_peers: tuple[PeerRecord, ...] = ()
    provider_peers: tuple[PeerRecord, ...] = ()

    def __post_init__(self) -> None:
        # Every type but PING is about a key (FIND_NODE's is a peer id).
        _check_bytes("key", self.key, MAX_KEY_BYTES, allow_empty=self.type == MessageType.PING)
        if len(self.closer_peers) > MAX_CLOSER_PEERS:
            raise MessageError(
                f"{len(self.closer_peers)} closer peers, more than {MAX_CLOSER_PEERS}"
            )
        if len(self.provider_peers) > MAX_PROVIDER_PEERS:
            raise MessageError(
                f"{len(self.provider_peers)} provider peers, more than {MAX_PROVIDER_PEERS}"
            )
        # Storing a record under a different key than the one asked for is how a peer would
        # poison someone else's key; the spec's implementations reject it too.
        if self.type == MessageType.PUT_VALUE and (
            self.record is None or self.record.key != self.key
        ):
            raise MessageError("PUT_VALUE needs a record whose key is the message key")


def _peer_to_pb(peer: PeerRecord) -> pb.Message.Peer:
    connection = pb.Message.ConnectionType.ValueType(peer.connection)
    return pb.Message.Peer(id=peer.peer_id, addrs=peer.addrs, connection=connection)


def _peer_from_pb(peer: pb.Message.Peer) -> PeerRecord:
    if len(peer.addrs) > MAX_ADDRS_PER_PEER:  # before copying them into a tuple
        raise MessageError(
            f"{len(peer.addrs)} addresses for a peer, more than {MAX_ADDRS_PER_PEER}"
        )
    try:
        connection = ConnectionType(peer.connection)
    except ValueError:
        raise MessageError(f"unknown connection type {peer.connection}") from None
    return PeerRecord(peer.id, tuple(peer.addrs), connection)


def encode_message(msg: KadMessage) -> bytes:
    """The frame for `msg`: unsigned-varint length, then the protobuf bytes."""
    proto = pb.Message(
        type=pb.Message.MessageType.ValueType(msg.type),
        key=msg.key,
        closerPeers=[_peer_to_pb(p) for p in msg.closer_peers],
        providerPeers=[_peer_to_pb(p) for p in msg.provider_peers],
    )
    if msg.record is not None:
        r = msg.record
        proto.record.CopyFrom(pb.Record(key=r.key, value=r.value, timeReceived=r.time_received))
    body = proto.SerializeToString(deterministic=True)
    if len(body) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message is {len(body)} bytes, more than {MAX_MESSAGE_BYTES}")
    return _encode_varint(len(body)) + body


def decode_message(body: bytes) -> KadMessage:
    """Parses and validates one message body (the bytes after the length prefix)."""
    if len(body) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message is {len(body)} bytes, more than {MAX_MESSAGE_BYTES}")
    try:
        proto = pb.Message.FromString(body)
    except DecodeError as e:
        raise MessageError(f"not a kad-dht protobuf message: {e}") from None
    try:
        msg_type = MessageType(proto.type)
    except ValueError:
        raise MessageError(f"unknown message type {proto.type}") from None
    # Count before converting: the protobuf parse is bounded by the message size, the
    # conversion should not even start on a list we are going to reject.
    if len(proto.closerPeers) > MAX_CLOSER_PEERS:
        raise MessageError(f"{len(proto.closerPeers)} closer peers, more than {MAX_CLOSER_PEERS}")
    if len(proto.providerPeers) > MAX_PROVIDER_PEERS:
        raise MessageError(
            f"{len(proto.providerPeers)} provider peers, more than {MAX_PROVIDER_PEERS}"
        )
    record = None
    if proto.HasField("record"):
        r = proto.record
        record = DhtRecord(r.key, r.value, r.timeReceived)
    return KadMessage(
        type=msg_type,
        key=proto.key,
        record=record,
        closer_peers=tuple(_peer_from_pb(p) for p in proto.closerPeers),
        provider_peers=tuple(_peer_from_pb(p) for p in proto.providerPeers),
    )


async def read_message(stream: ByteStream, *, max_size: int = MAX_MESSAGE_BYTES) -> KadMessage:
    """Reads one framed message from `stream` and validates it.

    Reads at most the prefix plus `max_size` bytes, never past the end of this message. A stream
    that ends early (`b""` or `EOFError`, which py-libp2p's `StreamEOF` is) raises
    `MessageError`; other stream errors (reset, closed) propagate. Not cancel-safe: a cancelled
    read leaves the stream mid-frame, so the caller must drop the stream."""
    if not 0 <= max_size <= MAX_MESSAGE_BYTES:
        raise ValueError(f"max_size must be in [0, {MAX_MESSAGE_BYTES}], got {max_size}")
    length = await _read_length(stream, max_size)
    return decode_message(await _read_exactly(stream, length))


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


async def _read_length(stream: ByteStream, max_size: int) -> int:
    """The unsigned-varint prefix (multiformats: minimal encoding, little-endian 7-bit groups).
    Rejects as soon as the value passes `max_size`, so it reads at most a few bytes."""
    max_len = max(1, (max_size.bit_length() + 6) // 7)
    value = 0
    for i in range(max_len):
        byte = (await _read_exactly(stream, 1))[0]
        value |= (byte & 0x7F) << (7 * i)
        if value > max_size:
            raise MessageError(f"message length over {max_size} bytes")
        if not byte & 0x80:
            if byte == 0 and i > 0:  # e.g. 0x80 0x00: the spec forbids non-minimal varints
                raise MessageError("length prefix is not a minimal varint")
            return value
    raise MessageError(f"length prefix longer than {max_len} bytes")


async def _read_exactly(stream: ByteStream, n: int) -> bytes:
    """Exactly `n` bytes; `n` is already bounded by the caller, so is the buffer."""
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = await stream.read(n - len(buf))
        except EOFError:
            chunk = b""
        if not chunk:
            raise MessageError(f"stream ended {n - len(buf)} bytes short of the message")
        if len(chunk) > n - len(buf):  # a broken stream must not overrun the bound
            raise MessageError("stream returned more bytes than asked for")
        buf += chunk
    return bytes(buf)
