"""Hypothesis strategies for hostile peers (issue 10 item 3): every protocol a `petald serve`
daemon speaks, as `Exchange`s — the bytes one stream carries from the attacker, cut into the
messages it counts, and how the attacker ends the stream. Messages are malformed (bad varints,
oversized lengths, garbage protobuf and CBOR, corrupt tensor frames) or well-formed but hostile
(wrong types and shapes, out-of-range steps and positions, bogus push tokens and signatures,
forged records and announcements, huge peer and topic lists).

Entry point: `exchanges(hidden_size, model, keys)`, one strategy over all protocols, drawn by
petald.testing.fuzz; `PROTOCOLS` names each kind's libp2p protocol id."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Literal

import cbor2
from hypothesis import strategies as st
from libp2p.crypto.keys import KeyPair
from libp2p.pubsub.pb import rpc_pb2
from libp2p.relay.circuit_v2.pb import circuit_pb2

from petald import _native
from petald.dht.announce import model_key, topic_for
from petald.dht.records import sign_record
from petald.wire.kad_messages import PROTOCOL_ID as KAD_PROTOCOL
from petald.wire.messages import _varint
from petald.wire.pb import kad_pb2
from petald.wire.protocols import (
    BACKWARD_PROTOCOL,
    FORWARD_PROTOCOL,
    INFERENCE_PROTOCOL,
    INFO_PROTOCOL,
    PUSH_PROTOCOL,
)

PROTOCOLS = {
    "kad": KAD_PROTOCOL,
    "gossip": "/meshsub/1.1.0",
    "dialback": "/petald/dialback/1.0.0",
    "relay-hop": "/libp2p/circuit/relay/0.2.0/hop",
    "relay-stop": "/libp2p/circuit/relay/0.2.0/stop",
    "info": INFO_PROTOCOL,
    "forward": FORWARD_PROTOCOL,
    "backward": BACKWARD_PROTOCOL,
    "inference": INFERENCE_PROTOCOL,
    "push": PUSH_PROTOCOL,
    "echo": "/petald/echo/1.0.0",
    "identify-push": "/ipfs/id/push/1.0.0",
}

# close: half-close after the last message, then read the answer to its end; cut: reset the
# stream right after writing (a peer gone mid-message).
End = Literal["close", "cut"]


@dataclass(frozen=True)
class Exchange:
    kind: str  # a key of PROTOCOLS
    messages: tuple[bytes, ...]  # written in order; each is one adversarial message
    end: End = "close"

    @property
    def protocol(self) -> str:
        return PROTOCOLS[self.kind]


def framed(body: bytes) -> bytes:
    return _varint(len(body)) + body


# Length prefixes no honest peer sends: overlong varints, lengths past every limit, 2^63+.
BAD_PREFIXES = st.sampled_from(
    [b"\xff" * 11, b"\x80" * 9 + b"\x01", _varint(1 << 31), _varint(1 << 62), _varint(70_000)]
)
garbage = st.binary(max_size=96)
small_ints = st.integers(-3, 70)
wild_ints = st.one_of(small_ints, st.integers(-(2**70), 2**70))
cbor_leaves = st.one_of(
    st.none(),
    st.booleans(),
    wild_ints,
    st.floats(),
    st.text(max_size=16),
    st.binary(max_size=24),
)
cbor_values = st.recursive(
    cbor_leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)


def header_maps(fields: list[str]) -> st.SearchStrategy[dict]:
    """CBOR maps over a protocol's own field names (and strangers), values of any type."""
    return st.dictionaries(
        st.one_of(st.sampled_from(fields), st.text(max_size=8)), cbor_values, max_size=6
    )


DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "uint8": 1}


@st.composite
def tensor_frames(draw, hidden: int) -> bytes:
    """A well-formed frame (often of the shape a server wants, any dtype, NaNs included), or
    one corrupted by a flipped byte or a truncation."""
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    if draw(st.booleans()):
        shape = (draw(st.integers(0, 3)), draw(st.integers(0, 4)), hidden)
    else:
        shape = tuple(draw(st.lists(st.integers(0, 6), max_size=5)))
    size = math.prod(shape) * DTYPES[dtype]
    fill = draw(st.sampled_from([b"\x00", b"\xff", b"\x7f", b"\x3c"]))  # 0xff..: NaNs in floats
    codec = draw(st.sampled_from(["none", "zstd"]))
    frame = _native.encode(fill * size, dtype, list(shape), codec, _native.DEFAULT_CHUNK_SIZE)
    damage = draw(st.sampled_from(["none", "none", "flip", "truncate"]))
    if damage == "flip" and frame:
        i = draw(st.integers(0, len(frame) - 1))
        frame = frame[:i] + bytes([frame[i] ^ 0xFF]) + frame[i + 1 :]
    elif damage == "truncate":
        frame = frame[: draw(st.integers(0, max(0, len(frame) - 1)))]
    return frame


@st.composite
def petald_messages(draw, fields: list[str], hidden: int, header=None) -> bytes:
    """One message of petald.wire.messages: CBOR header + frames, with a header that may lie
    about its tensor count, or plain garbage / a bad length prefix."""
    shape = draw(st.sampled_from(["message", "message", "message", "garbage", "prefix"]))
    if shape == "garbage":
        return draw(garbage)
    if shape == "prefix":
        return draw(BAD_PREFIXES) + draw(garbage)
    head = dict(draw(header if header is not None else header_maps(fields)))
    frames = draw(st.lists(tensor_frames(hidden), max_size=3))
    head["tensors"] = draw(st.sampled_from([len(frames), len(frames), len(frames) + 1, -1, 99]))
    return framed(cbor2.dumps(head)) + b"".join(framed(f) for f in frames)


FORWARD_FIELDS = ["start", "end", "codec", "positions", "all_hidden", "named", "lora_scale"]
STEP_FIELDS = ["step", "position", "positions", "reorder", "next", "upstream", "close", "trace"]


@st.composite
def step_headers(draw) -> dict:
    """Inference steps with hostile values: out-of-range positions, junk reorders, bogus push
    targets (`next` with tokens of any length), unknown upstreams."""
    head = {"step": draw(st.one_of(st.integers(0, 5), cbor_values))}
    head["position"] = draw(st.one_of(st.integers(-2, 40), cbor_values))
    extra = draw(header_maps(STEP_FIELDS))
    if draw(st.booleans()):
        extra["next"] = {
            "peer": draw(st.text(max_size=140)),
            "session": draw(st.binary(max_size=20)),
        }
    return head | extra


@st.composite
def inference_exchanges(draw, hidden: int) -> Exchange:
    valid_open = {"batch": 1, "max_length": draw(st.integers(1, 16)), "codec": "none"}
    opening = draw(st.one_of(st.just(valid_open), header_maps(["batch", "max_length", "start"])))
    steps = draw(st.lists(petald_messages(STEP_FIELDS, hidden, header=step_headers()), max_size=12))
    end = draw(st.sampled_from(["close", "close", "cut"]))
    return Exchange("inference", (framed(cbor2.dumps(opening)), *steps), end)


@st.composite
def kad_messages(draw, keys: list[KeyPair], model: str) -> bytes:
    """A kad-dht request: garbage, a bad prefix, or a protobuf with hostile fields — unknown
    types, huge keys, 1000 closer peers, and PUT records that are forged, tampered, expired or
    not CBOR."""
    shape = draw(st.sampled_from(["pb", "pb", "pb", "garbage", "prefix"]))
    if shape == "garbage":
        return draw(garbage)
    if shape == "prefix":
        return draw(BAD_PREFIXES) + draw(garbage)
    msg = kad_pb2.Message(type=draw(st.integers(-1, 9)), key=draw(st.binary(max_size=300)))
    msg.clusterLevelRaw = draw(st.integers(-(2**31), 2**31 - 1))
    # One drawn peer, repeated: a thousand draws per message would make the corpus slow to draw.
    peer_id, addr = draw(st.binary(max_size=40)), draw(garbage)
    for _ in range(draw(st.sampled_from([0, 0, 3, 1000]))):
        msg.closerPeers.add(id=peer_id, addrs=[addr])
    if draw(st.booleans()):
        msg.type = kad_pb2.Message.PUT_VALUE
        msg.key = draw(st.sampled_from([model_key(model), b"k", b"x" * 256]))
        msg.record.key = msg.key
        msg.record.value = draw(signed_values(keys, msg.key))
    return framed(msg.SerializeToString())


@st.composite
def signed_values(draw, keys: list[KeyPair], key: bytes) -> bytes:
    """Record values: garbage, or a record signed by one of the attacker's keys that is then
    tampered with, expired, or claims a lifetime no honest peer would."""
    if draw(st.booleans()):
        return draw(garbage)
    pair = draw(st.sampled_from(keys))
    expires = time.time() + draw(st.sampled_from([-10.0, 60.0, 10 * 86400.0]))
    record = sign_record(pair.private_key, key, draw(st.binary(max_size=64)), expires)
    damage = draw(st.sampled_from(["none", "value", "subkey"]))
    if damage == "value":
        record = dataclasses.replace(record, value=record.value + b"!")
    elif damage == "subkey":
        record = dataclasses.replace(record, subkey=draw(st.binary(min_size=1, max_size=40)))
    return record.to_bytes()


@st.composite
def gossip_rpcs(draw, keys: list[KeyPair], model: str) -> bytes:
    """A gossipsub RPC: garbage, an oversized prefix, thousands of subscriptions, control
    messages naming unknown messages, or publishes of forged announcements on the model's
    topic (garbage records, tampered or signed for another key)."""
    shape = draw(st.sampled_from(["publish", "publish", "subs", "control", "garbage", "prefix"]))
    if shape == "garbage":
        return framed(draw(garbage))
    if shape == "prefix":
        return draw(BAD_PREFIXES) + draw(garbage)
    rpc = rpc_pb2.RPC()
    topic = draw(st.sampled_from([topic_for(model), topic_for("other"), "x" * 300]))
    if shape == "subs":
        subscribe = draw(st.booleans())
        for i in range(draw(st.sampled_from([1, 5, 2000]))):
            rpc.subscriptions.add(subscribe=subscribe, topicid=f"{topic[:40]}/{i}")
    elif shape == "control":
        ids = [draw(st.binary(max_size=20)) for _ in range(draw(st.integers(0, 5)))]
        rpc.control.ihave.add(topicID=topic, messageIDs=ids)
        rpc.control.iwant.add(messageIDs=ids)
        rpc.control.graft.add(topicID=topic)
        rpc.control.prune.add(topicID=topic, backoff=draw(st.integers(0, 2**63 - 1)))
    else:
        data = draw(signed_values(keys, model_key(model)))
        rpc.publish.add(
            data=data,
            topicIDs=[topic],
            seqno=draw(st.binary(max_size=8)),
            signature=draw(st.binary(max_size=64)),
            key=draw(st.binary(max_size=40)),
            from_id=draw(st.binary(max_size=40)),
        )
    return framed(rpc.SerializeToString())


@st.composite
def relay_messages(draw) -> bytes:
    """Circuit relay v2 HOP/STOP messages with hostile types, peers and limits, or garbage."""
    if draw(st.booleans()):
        return draw(st.one_of(garbage.map(framed), BAD_PREFIXES))
    cls = draw(st.sampled_from([circuit_pb2.HopMessage, circuit_pb2.StopMessage]))
    msg = cls(type=draw(st.integers(0, 5)))
    if draw(st.booleans()):
        msg.peer.id = draw(st.binary(max_size=40))
        msg.peer.addrs.extend(draw(st.lists(garbage, max_size=3)))
    if draw(st.booleans()):
        msg.limit.duration = draw(st.integers(0, 2**32 - 1))
        msg.limit.data = draw(st.integers(0, 2**64 - 1))
    return framed(msg.SerializeToString())


def dialback_lines() -> st.SearchStrategy[bytes]:
    """Dial-back requests: non-JSON, wrong JSON types, addresses that are junk or not ours
    (a loopback port nobody listens on: a refused dial costs microseconds), overlong lines."""
    addrs = st.lists(
        st.one_of(
            st.text(max_size=40),
            st.just("/ip4/127.0.0.1/tcp/1"),
            st.just("/ip4/10.0.0.1/tcp/4001"),
            st.just("/dns4/localhost/tcp/1"),
        ),
        max_size=6,
    )
    json_line = st.one_of(addrs.map(lambda a: {"addrs": a}), cbor_values)
    return st.one_of(
        json_line.map(lambda v: (repr(v).replace("'", '"') + "\n").encode()),
        garbage,
        st.just(b"{" * 5000),
    )


@st.composite
def exchanges(
    draw, hidden: int, model: str, keys: list[KeyPair], kind: str | None = None
) -> Exchange:
    """One stream's worth of hostile messages, of protocol `kind` (any when None). Protocols
    that read many messages per stream get many (inference steps, gossip RPCs, echo frames)."""
    if kind is None:
        kind = draw(st.sampled_from(sorted(PROTOCOLS)))
    end: End = draw(st.sampled_from(["close", "close", "close", "cut"]))
    if kind == "inference":
        return draw(inference_exchanges(hidden))
    if kind in ("info", "forward", "backward"):
        msg = draw(petald_messages(FORWARD_FIELDS, hidden))
        return Exchange(kind, (msg,), end)
    if kind == "push":
        token = draw(st.one_of(st.binary(min_size=16, max_size=16), cbor_values))
        steps = draw(st.lists(petald_messages(["step", "position"], hidden), max_size=4))
        return Exchange(kind, (framed(cbor2.dumps({"session": token})), *steps), end)
    if kind == "kad":
        return Exchange(kind, (draw(kad_messages(keys, model)),), end)
    if kind == "gossip":
        return Exchange(
            kind, tuple(draw(st.lists(gossip_rpcs(keys, model), min_size=1, max_size=12))), end
        )
    if kind in ("relay-hop", "relay-stop"):
        return Exchange(kind, (draw(relay_messages()),), end)
    if kind == "dialback":
        return Exchange(kind, (draw(dialback_lines()),), end)
    if kind == "echo":
        sizes = st.one_of(st.integers(0, 64), st.just(2**32 - 1), st.just(1 << 21))
        frames = draw(
            st.lists(
                sizes.map(lambda n: n.to_bytes(4, "big") + b"e" * min(n, 64)),
                min_size=1,
                max_size=12,
            )
        )
        return Exchange(kind, tuple(frames), end)
    return Exchange(kind, (draw(st.one_of(garbage.map(framed), BAD_PREFIXES, garbage)),), end)
