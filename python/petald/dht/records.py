"""Signed DHT records: what petald stores under a DHT key. A record is a canonical CBOR map signed
by the publishing peer's libp2p Ed25519 key; its subkey is the publisher's peer id, so one key
("block 12 of model X") holds one entry per server and nobody can overwrite another's entry.
Entry points: `sign_record(...)` to publish, `SignedRecord.from_bytes(data, now=...)` to accept
bytes from a peer (it validates everything), and `RecordStore` to keep them in memory.

The signature covers `SIGNATURE_DOMAIN` + the canonical CBOR (RFC 8949 section 4.2.1) of every
field but the signature, so a record signed here cannot be replayed as some other signed petald
object. `from_bytes` also requires the input to be exactly the canonical encoding, so one record
has one byte string (no malleable re-encodings that look like different records)."""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, NoReturn

import cbor2
from google.protobuf.message import DecodeError
from libp2p.crypto.ed25519 import Ed25519PublicKey
from libp2p.crypto.keys import KeyType, PrivateKey
from libp2p.crypto.pb import crypto_pb2
from libp2p.peer.id import ID

from petald.errors import RecordError
from petald.wire.kad_messages import MAX_KEY_BYTES, MAX_PEER_ID_BYTES

__all__ = [
    "MAX_CLOCK_SKEW_SECONDS",
    "MAX_RECORD_BYTES",
    "MAX_STORE_BYTES",
    "MAX_STORE_KEYS",
    "MAX_SUBKEYS_PER_KEY",
    "MAX_TTL_SECONDS",
    "SIGNATURE_DOMAIN",
    "RecordStore",
    "RejectReason",
    "SignedRecord",
    "sign_record",
]

SIGNATURE_DOMAIN = b"petald-dht-record:v1"
# One encoded record (an announcement is ~400 bytes). Well under the kad-dht record value,
# which carries a bundle of many publishers' records in a GET answer.
MAX_RECORD_BYTES = 16 * 1024
# Publishers republish well within a day; a record that claims to live longer would outlive its
# publisher leaving (and let one peer pin an entry for good), so it is rejected.
MAX_TTL_SECONDS = 24 * 3600.0
# Clocks of honest peers disagree by seconds to minutes; forgive that much on the future bound.
MAX_CLOCK_SKEW_SECONDS = 300.0
# A libp2p-protobuf Ed25519 public key is 36 bytes; an Ed25519 signature is exactly 64.
# RecordStore bounds. A key is one block of one model; 4096 covers a few large models' blocks.
MAX_STORE_KEYS = 4096
# One entry per publisher: a model's announcements are one key, one entry per server (issue
# 12: 128 hid servers past the 128th from every reader). What a GET answer can carry (~550
# announcements, petald.wire.kad_messages.MAX_RECORD_VALUE_BYTES) is the bound that matters.
MAX_SUBKEYS_PER_KEY = 512
# The binding bound in practice (keys x subkeys x MAX_RECORD_BYTES would be gigabytes).
MAX_STORE_BYTES = 32 * 1024 * 1024
_ED25519_KEY_BYTES = 32
_SIGNATURE_BYTES = 64
_MAX_PUBLIC_KEY_BYTES = 64

_FIELDS = frozenset({"key", "subkey", "value", "pubkey", "expires", "sig"})
# The semantic tags cbor2 decodes natively (datetimes, bignums, regexes, MIME, shared references,
# ...). A record has no tags at all, so none of that code should run on a peer's bytes; tags
# cbor2 does not know go to `_reject_tag`. The list is from cbor2 6.2 (probe: every tag below
# 70000); a tag added later is still caught by the type and canonical-encoding checks.
_CBOR_BUILTIN_TAGS = (
    *(0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100),
    *(256, 258, 260, 261, 1004, 43000, 55799),
)


class RejectReason(enum.StrEnum):
    """Why a record was refused; `RecordError.reason` and `RecordStore.rejected` use these."""

    OVERSIZE = "oversize"
    MALFORMED = "malformed"  # not CBOR, wrong shape or types, not canonical, bad public key
    # Forged and tampered records look the same: the signature does not verify for the claimed
    # key over the received fields. Which of the two happened is unknowable, so one counter.
    BAD_SIGNATURE = "bad_signature"
    WRONG_PUBLISHER = "wrong_publisher"  # validly signed, but the subkey is someone else's id
    EXPIRED = "expired"
    TOO_FAR_FUTURE = "too_far_future"
    STORE_FULL = "store_full"
    NOT_NEWER = "not_newer"  # the store already has this (key, subkey) with a later expiration


def _fail(reason: RejectReason, message: str) -> NoReturn:
    raise RecordError(message, reason=reason.value)


def _reject_tag(*_: Any) -> NoReturn:
    raise cbor2.CBORDecodeError("CBOR tags are not allowed in a record")


_NO_TAGS = dict.fromkeys(_CBOR_BUILTIN_TAGS, _reject_tag)


@dataclasses.dataclass(frozen=True, slots=True)
class SignedRecord:
    """One publisher's entry under `key`. Build with `sign_record` or `from_bytes`; a value
    constructed by hand is only trusted after `validate`."""

    key: bytes
    subkey: bytes  # the publisher's peer id (multihash bytes)
    value: bytes
    public_key: bytes  # the publisher's libp2p public key, protobuf-serialized
    expiration: float  # unix seconds
    signature: bytes
    # `to_bytes()`, kept: a GET answer bundles every publisher's encoded record, and encoding
    # them again for every answer was a large share of the 1,000-peer simulation's CPU. Not an
    # init field, so `dataclasses.replace` starts a changed record without it.
    _encoded: bytes | None = dataclasses.field(default=None, init=False, compare=False, repr=False)

    def _unsigned(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "subkey": self.subkey,
            "value": self.value,
            "pubkey": self.public_key,
            "expires": self.expiration,
        }

    def signed_payload(self) -> bytes:
        return SIGNATURE_DOMAIN + cbor2.dumps(self._unsigned(), canonical=True)

    def to_bytes(self) -> bytes:
        if self._encoded is None:  # frozen: set once through object.__setattr__
            encoded = cbor2.dumps({**self._unsigned(), "sig": self.signature}, canonical=True)
            object.__setattr__(self, "_encoded", encoded)
            return encoded
        return self._encoded

    @classmethod
    def from_bytes(cls, data: bytes, *, now: float) -> SignedRecord:
        """Parses and validates a record from a peer. Raises `RecordError` (with `.reason`)."""
        if len(data) > MAX_RECORD_BYTES:
            _fail(RejectReason.OVERSIZE, f"record is {len(data)} bytes, over {MAX_RECORD_BYTES}")
        try:
            obj = cbor2.loads(
                data,
                max_depth=1,  # one flat map
                allow_indefinite=False,
                allow_duplicate_keys=False,
                strict_hashable_types=True,
                semantic_decoders=_NO_TAGS,
                tag_hook=_reject_tag,
            )
        except Exception as e:  # cbor2 raises CBORDecodeError, but also ValueError/TypeError
            _fail(RejectReason.MALFORMED, f"record is not CBOR: {e}")
        if type(obj) is not dict or obj.keys() != _FIELDS:
            _fail(RejectReason.MALFORMED, f"record must be a map with the fields {sorted(_FIELDS)}")
        for name in ("key", "subkey", "value", "pubkey", "sig"):
            if type(obj[name]) is not bytes:
                _fail(RejectReason.MALFORMED, f"record field {name!r} must be bytes")
        if type(obj["expires"]) is not float:
            _fail(RejectReason.MALFORMED, "record field 'expires' must be a float")
        record = cls(
            obj["key"], obj["subkey"], obj["value"], obj["pubkey"], obj["expires"], obj["sig"]
        )
        if record.to_bytes() != data:
            _fail(RejectReason.MALFORMED, "record is not in canonical CBOR")
        record.validate(now=now)
        return record

    def validate(self, *, now: float) -> None:
        """Checks sizes, the time window, the publisher and the signature, cheapest first."""
        if len(self.key) > MAX_KEY_BYTES or not self.key:
            _fail(RejectReason.OVERSIZE, f"record key must be 1 to {MAX_KEY_BYTES} bytes")
        if len(self.subkey) > MAX_PEER_ID_BYTES or len(self.public_key) > _MAX_PUBLIC_KEY_BYTES:
            _fail(RejectReason.OVERSIZE, "record subkey or public key too long")
        if len(self.to_bytes()) > MAX_RECORD_BYTES:
            _fail(RejectReason.OVERSIZE, f"record is over {MAX_RECORD_BYTES} bytes")
        if not math.isfinite(self.expiration) or self.expiration <= now:
            _fail(RejectReason.EXPIRED, f"record expired at {self.expiration} (now {now})")
        if self.expiration > now + MAX_TTL_SECONDS + MAX_CLOCK_SKEW_SECONDS:
            _fail(RejectReason.TOO_FAR_FUTURE, f"record expires more than {MAX_TTL_SECONDS}s ahead")
        public_key = _ed25519_public_key(self.public_key)
        if len(self.signature) != _SIGNATURE_BYTES:  # nacl raises ValueError, not False, here
            _fail(RejectReason.BAD_SIGNATURE, "signature is not 64 bytes")
        if not public_key.verify(self.signed_payload(), self.signature):
            _fail(RejectReason.BAD_SIGNATURE, "signature does not verify")
        if ID.from_pubkey(public_key).to_bytes() != self.subkey:
            _fail(RejectReason.WRONG_PUBLISHER, "subkey is not the signer's peer id")


def _ed25519_public_key(data: bytes) -> Ed25519PublicKey:
    """The key from its libp2p protobuf form; Ed25519 only, and only its canonical encoding
    (the protobuf parser would accept reordered or extra fields, a second name for one key)."""
    try:
        proto = crypto_pb2.PublicKey.FromString(data)
    except DecodeError:
        _fail(RejectReason.MALFORMED, "public key is not a libp2p protobuf key")
    if proto.key_type != crypto_pb2.KeyType.Ed25519 or len(proto.data) != _ED25519_KEY_BYTES:
        _fail(RejectReason.MALFORMED, "public key is not a 32-byte Ed25519 key")
    key = Ed25519PublicKey.from_bytes(proto.data)
    if key.serialize() != data:
        _fail(RejectReason.MALFORMED, "public key is not canonically encoded")
    return key


def sign_record(
    private_key: PrivateKey, key: bytes, value: bytes, expiration: float
) -> SignedRecord:
    """A record for `key` holding `value` (bytes; CBOR-encode structured payloads first), signed
    by `private_key` (Ed25519), under the subkey of its peer id, valid until `expiration`."""
    if private_key.get_type() != KeyType.Ed25519:
        raise ValueError("DHT records are signed with Ed25519 keys only (the daemon's identity)")
    if not isinstance(key, bytes) or not isinstance(value, bytes):
        raise TypeError("record key and value must be bytes")
    if not key or len(key) > MAX_KEY_BYTES:
        raise ValueError(f"record key must be 1 to {MAX_KEY_BYTES} bytes, got {len(key)}")
    public_key = private_key.get_public_key()
    unsigned = SignedRecord(
        key=key,
        subkey=ID.from_pubkey(public_key).to_bytes(),
        value=value,
        public_key=public_key.serialize(),
        expiration=float(expiration),
        signature=b"",
    )
    record = dataclasses.replace(unsigned, signature=private_key.sign(unsigned.signed_payload()))
    if len(record.to_bytes()) > MAX_RECORD_BYTES:
        raise ValueError(f"record is over {MAX_RECORD_BYTES} bytes; store less in the value")
    return record


class RecordStore:
    """In-memory records of the DHT keys this peer stores, bounded by `MAX_STORE_KEYS`,
    `MAX_SUBKEYS_PER_KEY` and `MAX_STORE_BYTES`. When full, new entries are refused (after
    dropping expired ones) rather than evicting: entries already held are validly signed and
    unexpired, and refusing is the cheapest answer to a peer flooding us. Sans-IO: `now` is
    passed in. `rejected` counts refusals by `RejectReason` for the daemon's status output."""

    def __init__(self) -> None:
        # key -> subkey -> (record, its encoded size)
        self._records: dict[bytes, dict[bytes, tuple[SignedRecord, int]]] = {}
        self._bytes = 0
        # A lower bound on the earliest expiration held, so a full store flooded with puts does
        # not rescan everything on each one: `expire` is O(1) until something can have expired.
        self._earliest = math.inf
        self._rejected = dict.fromkeys((r.value for r in RejectReason), 0)

    @property
    def rejected(self) -> dict[str, int]:
        """Refused `put`s by reason (a copy)."""
        return dict(self._rejected)

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return sum(len(subkeys) for subkeys in self._records.values())

    def put(self, record: SignedRecord, now: float) -> bool:
        """Stores `record` if valid and newer (by expiration) than the entry for its (key,
        subkey). Validates again, signature included: a `SignedRecord` may have been built by
        hand or checked at an earlier `now`. Returns whether it was stored."""
        try:
            record.validate(now=now)
        except RecordError as e:
            self._rejected[e.reason] += 1
            return False
        self.get(record.key, now)  # an expired entry under this key is no competition
        old = self._records.get(record.key, {}).get(record.subkey)
        if old is not None and old[0].expiration >= record.expiration:
            self._rejected[RejectReason.NOT_NEWER] += 1
            return False
        size = len(record.to_bytes())
        if not self._fits(record.key, old, size) and not (
            self.expire(now) and self._fits(record.key, old, size)
        ):
            self._rejected[RejectReason.STORE_FULL] += 1
            return False
        self._records.setdefault(record.key, {})[record.subkey] = (record, size)
        self._bytes += size - (old[1] if old is not None else 0)
        self._earliest = min(self._earliest, record.expiration)
        return True

    def _fits(self, key: bytes, old: tuple[SignedRecord, int] | None, size: int) -> bool:
        subkeys = self._records.get(key)
        if subkeys is None and len(self._records) >= MAX_STORE_KEYS:
            return False
        if subkeys is not None and old is None and len(subkeys) >= MAX_SUBKEYS_PER_KEY:
            return False
        return self._bytes - (old[1] if old is not None else 0) + size <= MAX_STORE_BYTES

    def get(self, key: bytes, now: float) -> list[SignedRecord]:
        """The unexpired records under `key`, ordered by subkey; drops the expired ones."""
        subkeys = self._records.get(key)
        if subkeys is None:
            return []
        for subkey in [s for s, (r, _) in subkeys.items() if r.expiration <= now]:
            self._bytes -= subkeys.pop(subkey)[1]
        if not subkeys:
            del self._records[key]
        return [subkeys[s][0] for s in sorted(subkeys)]

    def expire(self, now: float) -> int:
        """Drops every record expired at `now`; returns how many."""
        if now < self._earliest:
            return 0
        before = len(self)
        for key in list(self._records):
            self.get(key, now)
        self._earliest = min(
            (r.expiration for subkeys in self._records.values() for r, _ in subkeys.values()),
            default=math.inf,
        )
        return before - len(self)
