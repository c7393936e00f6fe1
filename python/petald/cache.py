"""Where petald keeps what it can compute again but would rather not at every start: measured
throughputs, tokenizers and configs converted from GGUF files. Entry point: `cache_dir()`; each
user writes its entries atomically (a whole entry or none) and treats a damaged one as missing."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """$PETALD_CACHE_DIR, else $XDG_CACHE_HOME/petald, else ~/.cache/petald."""
    if os.environ.get("PETALD_CACHE_DIR"):
        return Path(os.environ["PETALD_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "petald"


def gguf_entry(kind: str, gguf: Path) -> Path:
    """The cache entry of `kind` ("tokenizers", "gguf-configs") converted from the GGUF file
    `gguf`: keyed by its name, size and mtime and the transformers version that converted it."""
    import transformers

    stat = gguf.stat()
    key = f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}-transformers-{transformers.__version__}"
    return cache_dir() / kind / key


def save_pretrained_entry(obj: Any, where: Path) -> None:
    """`obj.save_pretrained` into a fresh directory then renamed to `where`, so that a
    concurrent reader sees a whole entry or none; a cache we cannot write only costs the next
    start its time."""
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=where.parent))
    except OSError:
        return
    try:
        obj.save_pretrained(str(tmp))
        os.rename(tmp, where)
    except OSError:  # another process saved it first, or the disk is full
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
