"""ServerInfo: round trip through CBOR, and every malformed announcement refused."""

import contextlib

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from petald.types import AnnouncementError, BlockRange, ServerInfo


def info(**kw: object) -> ServerInfo:
    base = dict(model="SmolLM2-135M", blocks=BlockRange(0, 15), state="online", throughput=12.5)
    return ServerInfo(**{**base, **kw})  # type: ignore[arg-type]


def test_round_trip() -> None:
    i = info(adapters=("a", "b"), addrs=("/ip4/127.0.0.1/tcp/1",), relayed=True, public_name="x")
    assert ServerInfo.from_cbor(i.to_cbor()) == i


def test_block_range_parse_and_bounds() -> None:
    assert BlockRange.parse("20:40") == BlockRange(20, 40)
    assert (
        len(BlockRange(20, 40)) == 20 and 25 in BlockRange(20, 40) and 40 not in BlockRange(20, 40)
    )
    for bad in ("20", "a:b", "40:20", "-1:3", "5:5"):
        with pytest.raises(ValueError, match="--blocks"):
            BlockRange.parse(bad)


@pytest.mark.parametrize(
    "patch",
    [
        {"blocks": [5, 2]},
        {"blocks": [0]},
        {"blocks": [0.0, 1.0]},
        {"state": "hacked"},
        {"throughput": float("nan")},
        {"throughput": -1},
        {"cache_tokens_free": -5},
        {"cache_tokens_free": 2**60},
        {"relayed": 1},
        {"model": ""},
        {"model": "x" * 300},
        {"adapters": ["a"] * 65},
        {"adapters": [1]},
        {"addrs": "not a list"},
    ],
)
def test_invalid_fields_are_refused(patch: dict) -> None:
    d = cbor2.loads(info().to_cbor())
    d.update(patch)
    with pytest.raises(AnnouncementError):
        ServerInfo.from_cbor(cbor2.dumps(d))


def test_missing_model_and_oversize() -> None:
    d = cbor2.loads(info().to_cbor())
    del d["model"]
    with pytest.raises(AnnouncementError, match="model"):
        ServerInfo.from_cbor(cbor2.dumps(d))
    with pytest.raises(AnnouncementError, match="over the limit"):
        ServerInfo.from_cbor(b"\0" * 20_000)


@given(st.binary(max_size=300))
def test_garbage_is_an_announcement_error(data: bytes) -> None:
    with contextlib.suppress(AnnouncementError):
        ServerInfo.from_cbor(data)
