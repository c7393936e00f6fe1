"""DHT messages on a stream: every message type round-trips, py-libp2p's own encoding parses, and
hostile input (random bytes, truncations, huge or malformed length prefixes, too many peers) is a
`MessageError`, never another exception, with reads bounded by what the limits allow."""

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.kad_dht.pb import kademlia_pb2 as libp2p_pb
from libp2p.network.stream.exceptions import StreamEOF

from petald.errors import MessageError, WireError
from petald.wire import kad_messages as km
from petald.wire.kad_messages import (
    ConnectionType,
    DhtRecord,
    KadMessage,
    MessageType,
    PeerRecord,
    decode_message,
    encode_message,
    read_message,
)
from petald.wire.pb import kad_pb2 as pb

FUZZ = settings(max_examples=300, deadline=None, derandomize=True)


class FakeStream:
    """Serves `data` at most `chunk` bytes per read, like a muxed stream; records every read."""

    def __init__(self, data: bytes, chunk: int = 1 << 30, eof: type[Exception] | None = None):
        self.data, self.pos, self.chunk, self.eof = data, 0, chunk, eof
        self.requests: list[int] = []

    async def read(self, n: int) -> bytes:
        self.requests.append(n)
        if self.pos >= len(self.data) and self.eof is not None:
            raise self.eof()
        out = self.data[self.pos : self.pos + min(n, self.chunk)]
        self.pos += len(out)
        return out


def read_sync(data: bytes, max_size: int = km.MAX_MESSAGE_BYTES) -> KadMessage:
    # FakeStream never blocks, so the coroutine finishes on its first step: no event loop needed
    # (and hypothesis examples stay cheap).
    coro = read_message(FakeStream(data), max_size=max_size)
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("read_message waited on a stream that never blocks")


def varint(n: int) -> bytes:
    return km._encode_varint(n)


PEER = PeerRecord(b"\x00\x24" + bytes(36), (b"\x04\x7f\x00\x00\x01\x06\x10\x00",))
EXAMPLES = [
    KadMessage(MessageType.PING),
    KadMessage(MessageType.FIND_NODE, b"\x00\x24" + bytes(36), closer_peers=(PEER,) * 20),
    KadMessage(MessageType.PUT_VALUE, b"k", record=DhtRecord(b"k", b"v" * 1000, "2026-01-01Z")),
    KadMessage(MessageType.GET_VALUE, b"k", record=DhtRecord(b"k", b""), closer_peers=(PEER,)),
    KadMessage(MessageType.ADD_PROVIDER, b"cid", provider_peers=(PEER,)),
    KadMessage(
        MessageType.GET_PROVIDERS,
        b"cid",
        closer_peers=(PeerRecord(b"a", connection=ConnectionType.CANNOT_CONNECT),),
        provider_peers=(PeerRecord(b"b", (b"x",) * 16, ConnectionType.CONNECTED),),
    ),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: m.type.name)
@pytest.mark.parametrize("chunk", [1, 3, 1 << 20])
async def test_every_type_round_trips_through_a_stream(msg: KadMessage, chunk: int) -> None:
    frame = encode_message(msg)
    stream = FakeStream(frame + encode_message(EXAMPLES[0]), chunk=chunk)
    assert await read_message(stream) == msg
    assert stream.pos == len(frame)  # the next message on the stream is left alone
    assert await read_message(stream) == EXAMPLES[0]


peers = st.builds(
    PeerRecord,
    st.binary(min_size=1, max_size=km.MAX_PEER_ID_BYTES),
    st.lists(st.binary(min_size=1, max_size=64), max_size=km.MAX_ADDRS_PER_PEER).map(tuple),
    st.sampled_from(ConnectionType),
)
messages = st.builds(
    KadMessage,
    st.sampled_from([t for t in MessageType if t != MessageType.PUT_VALUE]),
    st.binary(min_size=1, max_size=km.MAX_KEY_BYTES),
    st.none() | st.builds(DhtRecord, st.binary(min_size=1, max_size=32), st.binary(max_size=64)),
    st.lists(peers, max_size=km.MAX_CLOSER_PEERS).map(tuple),
    st.lists(peers, max_size=3).map(tuple),
)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(messages)
def test_random_messages_round_trip(msg: KadMessage) -> None:
    assert read_sync(encode_message(msg)) == msg


def test_py_libp2p_encoding_parses() -> None:
    # The same schema, compiled by py-libp2p, with its extra fields (signedRecord, senderRecord):
    # unknown fields are ignored, the rest maps one to one.
    theirs = libp2p_pb.Message(type=libp2p_pb.Message.GET_VALUE, key=b"k", senderRecord=b"env")
    theirs.record.CopyFrom(libp2p_pb.Record(key=b"k", value=b"v", timeReceived="t"))
    theirs.closerPeers.add(id=b"p", addrs=[b"a"], connection=1, signedRecord=b"s")
    body = theirs.SerializeToString()
    assert decode_message(body) == KadMessage(
        MessageType.GET_VALUE,
        b"k",
        DhtRecord(b"k", b"v", "t"),
        (PeerRecord(b"p", (b"a",), ConnectionType.CONNECTED),),
    )


def bad_body(**fields: object) -> bytes:
    msg = pb.Message(type=pb.Message.FIND_NODE, key=b"k")
    for name, value in fields.items():
        if name in ("closerPeers", "providerPeers"):
            getattr(msg, name).extend(value)  # type: ignore[call-overload]
        elif name == "record":
            msg.record.CopyFrom(value)  # type: ignore[arg-type]
        else:
            setattr(msg, name, value)
    return msg.SerializeToString()


ok_peer = pb.Message.Peer(id=b"p")
HOSTILE = {
    "21 closer peers": bad_body(closerPeers=[ok_peer] * 21),
    "21 provider peers": bad_body(providerPeers=[ok_peer] * 21),
    "17 addrs": bad_body(closerPeers=[pb.Message.Peer(id=b"p", addrs=[b"a"] * 17)]),
    "long addr": bad_body(closerPeers=[pb.Message.Peer(id=b"p", addrs=[bytes(513)])]),
    "empty addr": bad_body(closerPeers=[pb.Message.Peer(id=b"p", addrs=[b""])]),
    "long peer id": bad_body(closerPeers=[pb.Message.Peer(id=bytes(129))]),
    "empty peer id": bad_body(closerPeers=[pb.Message.Peer()]),
    "long key": bad_body(key=bytes(km.MAX_KEY_BYTES + 1)),
    "no key": bad_body(key=b""),
    "unknown type": bad_body(type=6),
    "unknown connection": bad_body(closerPeers=[pb.Message.Peer(id=b"p", connection=9)]),  # type: ignore[arg-type]
    "put without record": bad_body(type=pb.Message.PUT_VALUE),
    "put other key": bad_body(type=0, record=pb.Record(key=b"other", value=b"v")),
    "huge value": bad_body(record=pb.Record(key=b"k", value=bytes(km.MAX_RECORD_VALUE_BYTES + 1))),
    "bad utf-8": bytes.fromhex("1a03") + bytes.fromhex("2a01ff"),
    "bad protobuf": b"\xff\xff\xff",
}


@pytest.mark.parametrize("body", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_messages_are_message_errors(body: bytes) -> None:
    with pytest.raises(MessageError):
        read_sync(varint(len(body)) + body)


def test_message_error_is_a_wire_value_error() -> None:
    assert issubclass(MessageError, WireError) and issubclass(MessageError, ValueError)


@pytest.mark.parametrize(
    "prefix",
    [
        varint(km.MAX_MESSAGE_BYTES + 1),
        varint(2**63),
        b"\xff" * 64,  # endless continuation bits
        b"\x80" * 64,  # endless zero groups: the value never grows, the length bound stops it
        b"\x80\x00",  # a non-minimal zero
    ],
)
async def test_hostile_length_prefixes_stop_after_a_few_bytes(prefix: bytes) -> None:
    stream = FakeStream(prefix + bytes(1 << 20))
    with pytest.raises(MessageError):
        await read_message(stream)
    assert stream.pos <= 3 and all(n == 1 for n in stream.requests)


async def test_max_size_caps_the_read() -> None:
    frame = encode_message(EXAMPLES[2])
    stream = FakeStream(frame)
    with pytest.raises(MessageError):
        await read_message(stream, max_size=100)
    assert stream.pos <= 2
    with pytest.raises(ValueError):
        await read_message(stream, max_size=km.MAX_MESSAGE_BYTES + 1)


def test_encode_refuses_what_it_would_not_accept() -> None:
    fat = PeerRecord(bytes(128), (bytes(512),) * 16)
    full = DhtRecord(b"k", bytes(km.MAX_RECORD_VALUE_BYTES))
    with pytest.raises(MessageError):  # each within its bound, together over the message's
        encode_message(
            KadMessage(MessageType.GET_VALUE, b"k", record=full, closer_peers=(fat,) * 20)
        )
    with pytest.raises(MessageError):
        KadMessage(MessageType.FIND_NODE, b"k", closer_peers=(PEER,) * 21)
    with pytest.raises(MessageError):
        PeerRecord("not bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize("eof", [None, StreamEOF])
async def test_every_truncation_is_a_message_error(eof: type[Exception] | None) -> None:
    frame = encode_message(EXAMPLES[5])
    for cut in range(len(frame)):
        with pytest.raises(MessageError):
            await read_message(FakeStream(frame[:cut], chunk=7, eof=eof))


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_are_messages_or_message_errors(data: bytes) -> None:
    for frame in (data, varint(len(data)) + data):
        with contextlib.suppress(MessageError):
            read_sync(frame)


@FUZZ
@given(st.sampled_from(EXAMPLES), st.data())
def test_corrupted_frames_are_messages_or_message_errors(msg: KadMessage, data: st.DataObject):
    frame = bytearray(encode_message(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(frame) - 1))
        frame[i] = data.draw(st.integers(0, 255))
    with contextlib.suppress(MessageError):
        read_sync(bytes(frame))
