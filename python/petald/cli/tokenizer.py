"""The tokenizer of a model source, as `petald chat` and `petald demo` load it: from a model
directory or a Hub id as transformers does, and from a GGUF file through transformers' GGUF
conversion — which rebuilds the tokenizer from the file's vocabulary and merges and takes ~15 s
on a small machine — once: the result is saved under the petald cache directory (keyed by the
file's name, size and mtime and by the transformers version) and loaded from there next time
in a fraction of a second. Entry point: `load_tokenizer(source)`."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    path = Path(source).expanduser()
    if not (path.is_file() and path.suffix.lower() == ".gguf"):
        return AutoTokenizer.from_pretrained(source)
    cached = _cache_path(path)
    if (cached / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cached))
        except Exception:  # a damaged entry: converted again below, and replaced
            shutil.rmtree(cached, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    _save(tokenizer, cached)
    return tokenizer


def _cache_path(gguf: Path) -> Path:
    import transformers

    from petald.server.throughput import cache_dir

    stat = gguf.stat()
    key = f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}-transformers-{transformers.__version__}"
    return cache_dir() / "tokenizers" / key


def _save(tokenizer: Any, where: Path) -> None:
    """Saved into a fresh directory then renamed into place, so that a concurrent reader sees
    a whole entry or none; a cache we cannot write only costs the next start its time."""
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=where.parent))
    except OSError:
        return
    try:
        tokenizer.save_pretrained(str(tmp))
        os.rename(tmp, where)
    except OSError:  # another process saved it first, or the disk is full
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
