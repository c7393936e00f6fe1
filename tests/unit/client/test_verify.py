"""Verified computation's pieces without a network: the comparison tolerance against real block
computations (honest differences pass, a 1 % perturbed block does not), the weights policies
(petald.client.trust), the announcement's hash field and the hard bans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from petald.client.routing import PeerBans
from petald.client.trust import TrustedWeights, WeightsFilter, majority_refusals
from petald.client.verify import tolerance
from petald.p2p.swarm_view import ServerEntry
from petald.server.loading import load_span
from petald.testing.models import save_tiny_llama
from petald.types import AnnouncementError, BlockRange, ServerInfo

K = 8.0  # ClientConfig.verify_k's default


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("verify") / "tiny"
    save_tiny_llama(path, layers=4, seed=9)
    return path


def _incremental(span, x: torch.Tensor) -> torch.Tensor:
    """`x` through the span as a session does: a prefill of 5 tokens, then one at a time."""
    cache, outs, p = span.new_cache(1, 32), [], 0
    for n in [5] + [1] * (x.shape[1] - 5):
        outs.append(span.step(x[:, p : p + n].to(span.dtype), cache, p))
        p += n
    return torch.cat(outs, 1).float()


def test_tolerance_passes_honest_servers_and_catches_a_perturbed_block(tiny: Path) -> None:
    """A float32 server stepping token by token against a float32 witness's prefill, and
    against a bfloat16 one, agree within the tolerance of their coarser dtype; a server
    whose block 1 is perturbed by 1 % exceeds the float32 tolerance by far.
    Catches: a tolerance from the finer dtype of the two (min instead of max), without the
    activations' scale, or so loose that a 1 % perturbation passes."""
    torch.manual_seed(0)
    x = torch.randn(1, 12, 64) * 0.1
    fp32 = load_span(tiny, (0, 4), dtype="float32", progress=False)
    bf16 = load_span(tiny, (0, 4), dtype="bfloat16", progress=False)
    primary = _incremental(fp32, x)
    witness = fp32.forward(x).float()
    scale = float(witness.abs().max())
    diff32 = float((primary - witness).abs().max())
    assert diff32 <= tolerance(scale, 4, ["float32"], ["none"], K)
    diff16 = float((primary - bf16.forward(x.bfloat16()).float()).abs().max())
    assert diff16 <= tolerance(scale, 4, ["float32", "bfloat16"], ["none"], K)
    assert diff16 > tolerance(scale, 4, ["float32"], ["none"], K)  # the dtype matters
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in fp32.layers[1].parameters():
            p.mul_(1 + 0.01 * torch.randn(p.shape, generator=g))
    bad = _incremental(fp32, x)
    diff_bad = float((bad - witness).abs().max())
    assert diff_bad > 10 * tolerance(scale, 4, ["float32"], ["none"], K)
    print(f"\nfloat32 honest {diff32:.2g}, bfloat16 witness {diff16:.2g}, tampered {diff_bad:.2g}")


def entry(peer: str, start: int, end: int, hashes: bytes | None, dtype="float32") -> ServerEntry:
    """A server announcing `hashes` (one letter per block, e.g. b"aab") or none."""
    digests = tuple(bytes([h]) * 16 for h in hashes) if hashes is not None else ()
    info = ServerInfo(
        model="m", blocks=BlockRange(start, end), state="online", dtype=dtype, weight_hashes=digests
    )
    return ServerEntry(peer, info, published_at=0.0, expires_at=100.0, source="gossip")


def test_majority_refuses_the_outvoted_only() -> None:
    """Per block and dtype, a server whose hash has strictly fewer votes than another is
    refused; ties, other dtypes and servers without hashes are not.
    Catches: votes counted across dtypes, a tie refusing someone, hashless servers refused."""
    servers = [
        entry("A", 0, 3, b"aab"),
        entry("B", 2, 4, b"bc"),
        entry("C", 2, 4, b"Xc"),  # block 2 outvoted 2:1 by A and B
        entry("D", 3, 6, b"cde"),
        entry("E", 5, 6, b"Y"),  # block 5: E against D, 1:1
        entry("F", 0, 6, None),  # an older server
        entry("G", 2, 3, b"Z", dtype="bfloat16"),  # alone in its dtype
    ]
    refused = majority_refusals(servers)
    assert set(refused) == {"C"} and "block 2" in refused["C"]
    kept = WeightsFilter("majority", None)(servers)
    assert [e.peer_id for e in kept] == ["A", "B", "D", "E", "F", "G"]
    assert [e.peer_id for e in WeightsFilter("off", None)(servers)] == list("ABCDEFG")


def test_trusted_file_round_trip_and_refusals(tmp_path: Path) -> None:
    """`dumps` and `load` round trip; a server is trusted only with every block's hash in the
    file for its dtype; hashless and unlisted servers are refused; a broken file is a
    ValueError naming the flag.
    Catches: comparing only the first block, accepting hashless servers under "trusted"."""
    good = [bytes([c]) * 16 for c in b"abcd"]
    path = tmp_path / "w.json"
    path.write_text(TrustedWeights.dumps("m", BlockRange(0, 4), "float32", good))
    trusted = TrustedWeights.load(path)
    keep = WeightsFilter("trusted", trusted)
    servers = [
        entry("ok", 1, 3, b"bc"),
        entry("last-differs", 1, 3, b"bX"),
        entry("none", 0, 2, None),
        entry("other-dtype", 0, 2, b"ab", dtype="bfloat16"),
        entry("beyond", 3, 5, b"de"),
    ]
    assert [e.peer_id for e in keep(servers)] == ["ok"]
    assert set(keep.refused) == {"last-differs", "none", "other-dtype", "beyond"}
    with pytest.raises(ValueError, match="trusted weights"):
        WeightsFilter("trusted", None)
    for text in [
        "{",
        json.dumps({"format": "petald-weights/1", "dtype": "f", "blocks": {"0": "zz"}}),
    ]:
        path.write_text(text)
        with pytest.raises(ValueError, match="--trusted-weights"):
            TrustedWeights.load(path)
    with pytest.raises(ValueError, match="--trusted-weights"):
        TrustedWeights.load(tmp_path / "missing.json")


def test_announcement_hashes_round_trip_and_bad_ones_refused() -> None:
    """Catches: unvalidated weight_hashes from a peer (wrong count, size or type)."""
    info = ServerInfo(model="m", blocks=BlockRange(2, 4), weight_hashes=(b"a" * 16, b"b" * 16))
    assert ServerInfo.from_cbor(info.to_cbor()) == info
    assert (
        ServerInfo.from_cbor(ServerInfo(model="m", blocks=BlockRange(2, 4)).to_cbor()).weight_hashes
        == ()
    )
    for bad in [(b"a" * 16,), (b"a" * 15, b"b" * 16), ("a" * 16, "b" * 16)]:
        raw = ServerInfo(model="m", blocks=BlockRange(2, 4), weight_hashes=bad)  # type: ignore[arg-type]
        with pytest.raises(AnnouncementError, match="weight_hashes"):
            ServerInfo.from_cbor(raw.to_cbor())


def test_hard_ban_outlasts_the_cap_and_is_never_shortened() -> None:
    """Catches: a verdict ban capped like failures' backoff, or cut short by a later failure."""
    bans = PeerBans(base=5.0, cap=300.0)
    assert bans.ban("p", 0.0, hard=86400.0) == 86400.0
    bans.ban("p", 10.0)  # a later ordinary failure
    assert "p" in bans.banned(10_000.0)
    assert bans.ban("q", 0.0, at_least=1e9) == 300.0  # a peer's own retry time stays capped
