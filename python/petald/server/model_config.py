"""What the daemon of `petald serve` (and `petald chat`'s local swarm) needs to know of a model
before its compute process loads it: the number of transformer blocks, read straight from a GGUF
file's header (parsed by the Rust core) or a directory's config.json. transformers' config
loader costs seconds of imports (and GGUF parsing) in a process that otherwise never needs
transformers.

Entry point: `num_blocks(source)`."""

from __future__ import annotations

import json
from pathlib import Path


def num_blocks(source: str) -> int:
    """The model's number of transformer blocks. A Hub id, or a layout not known here, goes
    through transformers' config loader (petald.server.loading.read_config)."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        from petald.gguf_file import GGUFFile

        with GGUFFile(path) as gguf:
            count = gguf.metadata.get(f"{gguf.architecture}.block_count")
        if isinstance(count, int) and not isinstance(count, bool):
            return count
    elif (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        config = config.get("text_config", config)
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(config.get(key), int):
                return config[key]
    from petald.server.loading import read_config  # a Hub id, or a layout not known above

    return int(read_config(source).get_text_config().num_hidden_layers)
