"""The tokenizer of a model source, as `petald chat` and `petald demo` load it: from a model
directory or a Hub id as transformers does, and from a GGUF file through transformers' GGUF
conversion — which rebuilds the tokenizer from the file's vocabulary and merges and takes ~15 s
on a small machine — once: the result is saved under the petald cache directory (keyed by the
file's name, size and mtime and by the transformers version) and loaded from there next time
in a fraction of a second. Entry point: `load_tokenizer(source)`."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from petald.cache import gguf_entry, save_pretrained_entry


def load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    path = Path(source).expanduser()
    if not (path.is_file() and path.suffix.lower() == ".gguf"):
        return AutoTokenizer.from_pretrained(source)
    cached = gguf_entry("tokenizers", path)
    if (cached / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cached))
        except Exception:  # a damaged entry: converted again below, and replaced
            shutil.rmtree(cached, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    save_pretrained_entry(tokenizer, cached)
    return tokenizer
