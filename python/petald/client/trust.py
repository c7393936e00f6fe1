"""Which servers' weights a client accepts, from the hashes they announce
(`ServerInfo.weight_hashes`, computed at load by petald.server.weights): `WeightsFilter`, the
policy `ClientConfig.weights_policy` names, applied to every server list the client routes
over (`SwarmClient.live_servers`), and `TrustedWeights`, the file `petald weights-hash MODEL`
writes and `--trusted-weights FILE` reads.

Policies:
- "off": hashes are ignored (the default: a server's hashes are its own claim, see below).
- "majority": for each block and dtype, the hash most servers announce wins; a server that
  announces another hash for any block it serves, against strictly more servers, is refused.
  A tie refuses nobody (nothing to go by). A server announcing no hashes (older ones) is kept.
- "trusted": only servers whose dtype is in the trusted file and whose every block's hash is
  the file's. A server announcing no hashes is refused.

What it stops: honest mistakes (another checkpoint or revision under the same model name, a
corrupted download, a different dtype conversion) announce different hashes. What it does
not: a hostile server announces whatever hashes it likes; that is what verified computation
(petald.client.verify) is for. A majority of colluding servers wins "majority"."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Literal

from petald.p2p.swarm_view import ServerEntry
from petald.types import MAX_BLOCKS, WEIGHT_HASH_BYTES, BlockRange

log = logging.getLogger(__name__)

WeightsPolicy = Literal["off", "majority", "trusted"]
WEIGHTS_POLICIES: tuple[WeightsPolicy, ...] = ("off", "majority", "trusted")
FORMAT = "petald-weights/1"
MAX_FILE_BYTES = 4 * 2**20  # a hash file of 10,000 blocks is ~400 KiB


@dataclass(frozen=True)
class TrustedWeights:
    """Block digests known good, by (dtype, block)."""

    hashes: Mapping[tuple[str, int], bytes] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> TrustedWeights:
        """Reads a file `petald weights-hash` wrote; a ValueError says what is wrong with it."""
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except OSError as e:
            raise ValueError(f"--trusted-weights {path}: {e.strerror or e}") from None
        what = f"--trusted-weights {path}: not a file `petald weights-hash` wrote"
        if len(data) > MAX_FILE_BYTES:
            raise ValueError(f"{what} (over {MAX_FILE_BYTES} bytes)")
        try:
            d = json.loads(data)
            if d.get("format") != FORMAT or not isinstance(d.get("dtype"), str):
                raise ValueError("format/dtype")
            blocks = d["blocks"]
            if not isinstance(blocks, dict):
                raise ValueError("blocks")
            hashes = {}
            for k, v in blocks.items():
                b, h = int(k), bytes.fromhex(v)
                if not 0 <= b < MAX_BLOCKS or len(h) != WEIGHT_HASH_BYTES:
                    raise ValueError(k)
                hashes[(d["dtype"], b)] = h
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"{what} ({e})") from None
        return cls(hashes)

    @staticmethod
    def dumps(model: str, blocks: BlockRange, dtype: str, hashes: list[bytes]) -> str:
        """The file's text for `hashes` of `blocks` of `model` in `dtype`."""
        by_block = {str(b): h.hex() for b, h in zip(range(*astuple(blocks)), hashes, strict=True)}
        doc = {"format": FORMAT, "model": model, "dtype": dtype, "blocks": by_block}
        return json.dumps(doc, indent=1) + "\n"

    def refusal(self, entry: ServerEntry) -> str | None:
        """Why `entry` is not trusted (None: it is)."""
        info = entry.info
        if not info.weight_hashes:
            return "announces no weight hashes"
        for b, h in _digests(entry):
            want = self.hashes.get((info.dtype, b))
            if want is None:
                return f"block {b} in {info.dtype} is not in the trusted weights file"
            if h != want:
                return f"block {b}: weights differ from the trusted file's"
        return None


def _digests(entry: ServerEntry) -> list[tuple[int, bytes]]:
    """(block, hash) of each block `entry` announces a hash for (none: no hashes)."""
    info = entry.info
    return list(zip(range(info.blocks.start, info.blocks.end), info.weight_hashes, strict=False))


def majority_refusals(entries: Iterable[ServerEntry]) -> dict[str, str]:
    """Servers outvoted on some block's hash (same dtype), with why."""
    entries = list(entries)
    votes: dict[tuple[str, int], Counter[bytes]] = {}
    for e in entries:
        for b, h in _digests(e):
            votes.setdefault((e.info.dtype, b), Counter())[h] += 1
    refused = {}
    for e in entries:
        for b, h in _digests(e):
            count = votes[(e.info.dtype, b)]
            best = max(count.values())
            if count[h] < best:
                refused[e.peer_id] = (
                    f"block {b}: weights differ from {best} other server(s)' "
                    f"({count[h]} announce these)"
                )
                break
    return refused


class WeightsFilter:
    """The servers a client routes over, under its weights policy; each refusal is logged once
    per peer and reason."""

    def __init__(self, policy: WeightsPolicy, trusted: TrustedWeights | None) -> None:
        if policy not in WEIGHTS_POLICIES:
            raise ValueError(f"weights policy {policy!r}: use one of {', '.join(WEIGHTS_POLICIES)}")
        if policy == "trusted" and trusted is None:
            raise ValueError("the 'trusted' weights policy needs a trusted weights file")
        self.policy, self.trusted = policy, trusted
        self.refused: dict[str, str] = {}  # the last refusals, by peer id
        self._logged: set[tuple[str, str]] = set()

    def __call__(self, entries: list[ServerEntry]) -> list[ServerEntry]:
        if self.policy == "off":
            return entries
        if self.policy == "majority":
            refused = majority_refusals(entries)
        else:
            assert self.trusted is not None
            refused = {
                e.peer_id: why for e in entries if (why := self.trusted.refusal(e)) is not None
            }
        for peer, why in refused.items():
            if (peer, why) not in self._logged and len(self._logged) < 10_000:
                self._logged.add((peer, why))
                log.warning("not using server %s (weights policy %s): %s", peer, self.policy, why)
        self.refused = refused
        return [e for e in entries if e.peer_id not in refused]
