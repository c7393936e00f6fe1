"""The span's compute throughput, announced so clients and other servers can plan: measured by
the compute process at start (a forward of `TOKENS` tokens, best of three after a warm-up) and
cached per model, number of blocks, device, dtype, quantization and versions, so that restarts
do not pay for it again. The cache is a small JSON file in `cache_dir()`."""

from __future__ import annotations

import json
import logging

from petald import __version__
from petald.cache import cache_dir

log = logging.getLogger(__name__)

TOKENS = 128


def cache_key(model: str, worker: dict) -> str:
    n = worker["blocks"][1] - worker["blocks"][0]
    parts = [model, f"{n} blocks", worker["device"], worker["dtype"], worker["quant"]]
    # The compute process reports its torch version (the daemon does not import torch).
    return "|".join([*parts, f"torch {worker['torch']}", f"petald {__version__}"])


def load_cached(key: str) -> float | None:
    try:
        value = json.loads((cache_dir() / "throughput.json").read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, int | float) and value > 0 else None


def store(key: str, tokens_per_s: float) -> None:
    path = cache_dir() / "throughput.json"
    try:
        try:
            table = json.loads(path.read_text())
            table = table if isinstance(table, dict) else {}
        except (OSError, ValueError):
            table = {}
        table[key] = tokens_per_s
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        tmp.replace(path)  # atomic: two servers starting together never see half a file
    except OSError as e:  # a read-only home must not stop a server
        log.warning("could not cache the throughput in %s: %s", path, e)
