"""Signed DHT records and the record store: honest records round-trip; forged, tampered, expired,
far-future, oversize and garbage ones are a `RecordError` with the right reason (and are counted
by the store); the store keeps the newest entry per publisher within its bounds."""

import dataclasses
import math
import struct

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.pb import crypto_pb2
from libp2p.crypto.secp256k1 import create_new_key_pair as create_secp256k1_key_pair
from libp2p.peer.id import ID

from petald.dht import records
from petald.dht.records import (
    MAX_RECORD_BYTES,
    MAX_TTL_SECONDS,
    RecordStore,
    RejectReason,
    SignedRecord,
    sign_record,
)
from petald.errors import RecordError, WireError

NOW = 1_750_000_000.0
FUZZ = settings(max_examples=200, deadline=None, derandomize=True)


def key_pair(i: int) -> KeyPair:
    return create_new_key_pair(bytes([i + 1]) * 32)  # deterministic identities


ALICE, BOB, CAROL = key_pair(0), key_pair(1), key_pair(2)
KEY = b"/petald/model/tiny/block/12"


def honest(kp: KeyPair = ALICE, value: bytes = b"span 12..16", ttl: float = 600.0) -> SignedRecord:
    return sign_record(kp.private_key, KEY, value, NOW + ttl)


def resigned(record: SignedRecord, kp: KeyPair, **changes: object) -> SignedRecord:
    """`record` with `changes`, validly signed by `kp` over the changed fields."""
    changed = dataclasses.replace(record, **changes)  # type: ignore[arg-type]
    return dataclasses.replace(changed, signature=kp.private_key.sign(changed.signed_payload()))


def reason_of(data: bytes, now: float = NOW) -> str:
    with pytest.raises(RecordError) as info:
        SignedRecord.from_bytes(data, now=now)
    return info.value.reason


def test_round_trip_and_publisher() -> None:
    record = honest()
    assert SignedRecord.from_bytes(record.to_bytes(), now=NOW) == record
    assert record.subkey == ID.from_pubkey(ALICE.public_key).to_bytes()
    assert record.public_key == ALICE.public_key.serialize()
    assert issubclass(RecordError, WireError) and issubclass(RecordError, ValueError)


@FUZZ
@given(
    st.binary(min_size=1, max_size=256),
    st.binary(max_size=2048),
    st.floats(min_value=1e-3, max_value=MAX_TTL_SECONDS),
)
def test_random_records_round_trip(key: bytes, value: bytes, ttl: float) -> None:
    record = sign_record(BOB.private_key, key, value, NOW + ttl)
    assert SignedRecord.from_bytes(record.to_bytes(), now=NOW) == record


@pytest.mark.parametrize(
    ("forged", "reason"),
    [
        # Bob signs but claims Alice's key and id: the signature fails for Alice's key.
        (lambda r: resigned(r, BOB, public_key=ALICE.public_key.serialize()), "bad_signature"),
        # Bob signs with his own key but puts himself under Alice's subkey.
        (lambda r: resigned(r, BOB, public_key=BOB.public_key.serialize()), "wrong_publisher"),
        (lambda r: dataclasses.replace(r, value=b"span 0..80"), "bad_signature"),
        (lambda r: dataclasses.replace(r, key=b"/petald/other"), "bad_signature"),
        (lambda r: dataclasses.replace(r, subkey=honest(BOB).subkey), "bad_signature"),
        (lambda r: dataclasses.replace(r, expiration=r.expiration + 1), "bad_signature"),
        (lambda r: dataclasses.replace(r, signature=r.signature[:63]), "bad_signature"),
        (lambda r: dataclasses.replace(r, signature=b""), "bad_signature"),
        (lambda r: dataclasses.replace(r, public_key=r.public_key + b"\x18\x01"), "malformed"),
        (lambda r: dataclasses.replace(r, public_key=b"\xff"), "malformed"),
    ],
)
def test_forged_and_tampered_records_are_rejected(forged, reason: str) -> None:  # type: ignore[no-untyped-def]
    assert reason_of(forged(honest()).to_bytes()) == reason


def test_signature_is_domain_separated() -> None:
    record = honest()
    plain = cbor2.dumps(record._unsigned(), canonical=True)  # the same fields, no domain prefix
    bare = dataclasses.replace(record, signature=ALICE.private_key.sign(plain))
    assert reason_of(bare.to_bytes()) == "bad_signature"


@pytest.mark.parametrize(
    ("expiration", "reason"),
    [
        (NOW, "expired"),
        (NOW - 1, "expired"),
        (math.nan, "expired"),
        (math.inf, "expired"),
        (NOW + MAX_TTL_SECONDS + records.MAX_CLOCK_SKEW_SECONDS + 1, "too_far_future"),
    ],
)
def test_time_window(expiration: float, reason: str) -> None:
    record = resigned(honest(), ALICE, expiration=expiration)
    assert reason_of(record.to_bytes()) == reason


def test_oversize() -> None:
    assert reason_of(bytes(MAX_RECORD_BYTES + 1)) == "oversize"
    big = resigned(honest(), ALICE, value=bytes(MAX_RECORD_BYTES))
    with pytest.raises(RecordError, match="over"):
        big.validate(now=NOW)
    with pytest.raises(ValueError):
        sign_record(ALICE.private_key, KEY, bytes(MAX_RECORD_BYTES), NOW + 60)
    with pytest.raises(ValueError):
        sign_record(ALICE.private_key, bytes(257), b"", NOW + 60)


def test_only_ed25519_signs() -> None:
    with pytest.raises(ValueError, match="Ed25519"):
        sign_record(create_secp256k1_key_pair(b"\x01" * 32).private_key, KEY, b"", NOW + 60)


def encode(fields: dict[str, object], canonical: bool = True) -> bytes:
    return cbor2.dumps(fields, canonical=canonical)


def fields_of(record: SignedRecord) -> dict[str, object]:
    return {**record._unsigned(), "sig": record.signature}


@pytest.mark.parametrize(
    "mutate",
    [
        lambda f: {**f, "expires": int(f["expires"])},  # an int is not the signed float
        lambda f: {k: v for k, v in f.items() if k != "sig"},
        lambda f: {**f, "extra": b""},
        lambda f: {**f, "value": "text"},
        lambda f: {**f, "value": cbor2.CBORTag(2, b"\x01")},  # a bignum tag
        lambda f: {**f, "value": cbor2.CBORTag(9999, b"")},
        lambda f: [f],
    ],
)
def test_wrong_shapes_are_malformed(mutate) -> None:  # type: ignore[no-untyped-def]
    assert reason_of(encode(mutate(fields_of(honest())))) == "malformed"


def test_non_canonical_encodings_are_malformed() -> None:
    fields = fields_of(honest())
    reordered = dict(reversed(fields.items()))
    assert reason_of(encode(reordered, canonical=False)) == "malformed"
    # NOW + 1024 fits a float32, so canonical CBOR must use 4 bytes; the same value as a double
    # is the same record in a second encoding.
    short = honest(ttl=1024).to_bytes()
    exp = struct.pack(">f", NOW + 1024)
    assert short.count(b"\xfa" + exp) == 1
    assert reason_of(short.replace(b"\xfa" + exp, b"\xfb" + struct.pack(">d", NOW + 1024))) == (
        "malformed"
    )
    secp = crypto_pb2.PublicKey(key_type=crypto_pb2.KeyType.Secp256k1, data=bytes(33))
    assert reason_of(resigned(honest(), ALICE, public_key=secp.SerializeToString()).to_bytes()) == (
        "malformed"
    )


@FUZZ
@given(st.binary(max_size=1024))
def test_random_bytes_are_record_errors(data: bytes) -> None:
    with pytest.raises(RecordError):
        SignedRecord.from_bytes(data, now=NOW)


RAW = honest().to_bytes()


@FUZZ
@given(st.integers(0, len(RAW) - 1), st.integers(1, 255))
def test_every_corrupted_byte_is_rejected(i: int, flip: int) -> None:
    raw = bytearray(RAW)
    raw[i] ^= flip
    with pytest.raises(RecordError):
        SignedRecord.from_bytes(bytes(raw), now=NOW)


def test_every_truncation_is_rejected() -> None:
    for cut in range(len(RAW)):
        with pytest.raises(RecordError):
            SignedRecord.from_bytes(RAW[:cut], now=NOW)


def test_store_newest_wins_per_publisher() -> None:
    store = RecordStore()
    first, later = honest(ttl=100), honest(value=b"span 12..20", ttl=200)
    assert store.put(first, NOW) and store.put(honest(BOB), NOW)
    assert not store.put(first, NOW)  # the same expiration again
    assert store.put(later, NOW)
    assert not store.put(first, NOW)  # older than what is held
    assert set(store.get(KEY, NOW)) == {later, honest(BOB)}
    assert [r.subkey for r in store.get(KEY, NOW)] == sorted(r.subkey for r in store.get(KEY, NOW))
    assert store.rejected["not_newer"] == 2 and len(store) == 2


def test_store_rejects_and_counts_invalid_records() -> None:
    store = RecordStore()
    record = honest()
    assert not store.put(dataclasses.replace(record, value=b"tampered"), NOW)
    assert not store.put(resigned(record, BOB, public_key=BOB.public_key.serialize()), NOW)
    assert not store.put(record, record.expiration)  # validated at put time, not earlier
    assert not store.put(resigned(record, ALICE, expiration=NOW + 2 * MAX_TTL_SECONDS), NOW)
    assert not store.put(resigned(record, ALICE, value=bytes(MAX_RECORD_BYTES)), NOW)
    assert store.rejected == {r.value: 0 for r in RejectReason} | {
        "bad_signature": 1,
        "wrong_publisher": 1,
        "expired": 1,
        "too_far_future": 1,
        "oversize": 1,
    }
    assert len(store) == 0 and store.total_bytes == 0


def test_store_expiry() -> None:
    store = RecordStore()
    short, long = honest(ttl=10), honest(BOB, ttl=100)
    store.put(short, NOW)
    store.put(long, NOW)
    store.put(sign_record(CAROL.private_key, b"/other", b"", NOW + 10), NOW)
    assert store.get(KEY, NOW + 10) == [long]  # expiration == now counts as expired
    assert store.expire(NOW + 10) == 1  # the /other record
    assert store.expire(NOW + 50) == 0
    assert store.expire(NOW + 100) == 1 and len(store) == 0 and store.total_bytes == 0
    assert store.get(KEY, NOW) == []


def test_store_count_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records, "MAX_STORE_KEYS", 2)
    monkeypatch.setattr(records, "MAX_SUBKEYS_PER_KEY", 2)
    store = RecordStore()
    assert store.put(honest(ALICE, ttl=10), NOW) and store.put(honest(BOB), NOW)
    assert not store.put(honest(CAROL), NOW)  # a third publisher under one key
    assert store.put(sign_record(ALICE.private_key, b"/b", b"", NOW + 60), NOW)
    assert not store.put(sign_record(ALICE.private_key, b"/c", b"", NOW + 60), NOW)  # third key
    assert store.rejected["store_full"] == 2
    assert store.put(honest(ALICE, ttl=20), NOW)  # replacing an entry needs no new room
    assert store.put(honest(CAROL), NOW + 20)  # Alice's entry has expired: room again
    assert {r.subkey for r in store.get(KEY, NOW + 20)} == {
        honest(BOB).subkey,
        honest(CAROL).subkey,
    }


def test_store_byte_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    size = len(honest().to_bytes())
    monkeypatch.setattr(records, "MAX_STORE_BYTES", size + 10)
    store = RecordStore()
    assert store.put(honest(ALICE, ttl=10), NOW)
    assert not store.put(honest(BOB), NOW)
    assert store.put(honest(ALICE, ttl=20), NOW)  # the same size again, in place of the old one
    assert store.total_bytes == size
    assert store.expire(NOW + 5) == 0  # nothing to drop: the early return
    assert store.put(honest(BOB), NOW + 20)  # made room by expiring Alice's
    assert store.total_bytes == size and store.rejected["store_full"] == 1
