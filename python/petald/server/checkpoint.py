"""Where a served span's weights come from, and reading only the tensors of its blocks. Owns the
three kinds of source `petald serve MODEL` accepts: a local Hugging Face model directory
(`model.safetensors`, or shards named by `model.safetensors.index.json`), a GGUF file, and a
Hub repo id (downloaded with `allow_patterns` restricted to the config, the index and the shards
that hold the span). Entry points: `locate(source)`, then `SafetensorsBlocks` or `GGUFBlocks`,
whose `read_block(i)` returns block i's tensors and nothing else; `LoadStats` records what was
read so tests and logs can check that no other layer or the embeddings were touched.
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import PreTrainedModel

from petald.errors import HubUnreachable
from petald.gguf_file import GGUFFile, GGUFTensor
from petald.hf_internals import gguf_names, gguf_processor

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# A Hub repo id: "name" or "owner/name", as huggingface_hub validates them.
HUB_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")


@dataclass
class LoadStats:
    """What loading read: files opened and tensors taken out of them."""

    files: list[str] = field(default_factory=list)
    tensors: list[str] = field(default_factory=list)
    bytes_read: int = 0


@dataclass(frozen=True)
class Located:
    kind: str  # "dir", "gguf" or "hub"
    path: Path  # the directory or the GGUF file; empty for the Hub
    repo_id: str = ""


def locate(source: str | Path) -> Located:
    """Tell which kind of source `source` is; raises ValueError when it is none of them."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise ValueError(f"{path} has no {CONFIG_NAME}; pass a Hugging Face model directory")
        return Located("dir", path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path} is not a .gguf file; pass a GGUF file or a model directory")
        return Located("gguf", path)
    text = str(source)
    if text.endswith(".gguf") or text.startswith((".", "/", "~")) or not HUB_ID.match(text):
        raise ValueError(f"{text!r}: no such file or directory (and it is not a Hub repo id)")
    return Located("hub", Path(), repo_id=text)


def hub_snapshot(repo_id: str, patterns: list[str]) -> Path:
    """Download (or find in the local cache) only the files of `repo_id` matching `patterns`."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError as e:
        raise HubUnreachable(
            f"{repo_id!r} is no local path, so it was taken for a Hub repo id, but the Hugging "
            f"Face Hub is unreachable and it is not in the local cache ({e}); pass a local "
            "model directory or a .gguf file instead"
        ) from None
    except RepositoryNotFoundError:
        raise ValueError(f"{repo_id!r} is not a model repo on the Hugging Face Hub") from None


def block_key_pattern(layers_path: str, base_prefix: str) -> re.Pattern[str]:
    """Checkpoint keys of block tensors, with or without the base model prefix (checkpoints of
    `LlamaModel` say `layers.3.`, of `LlamaForCausalLM` `model.layers.3.`); group 1 is the block."""
    attr = layers_path.removeprefix(f"{base_prefix}.") if base_prefix else layers_path
    prefix = rf"(?:{re.escape(base_prefix)}\.)?" if base_prefix else ""
    return re.compile(rf"^{prefix}{re.escape(attr)}\.(\d+)\.")


def shard_map(directory: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the index, or from the single file's header."""
    index = directory / INDEX_NAME
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = directory / SINGLE_NAME
    if not single.is_file():
        raise ValueError(f"{directory} has neither {INDEX_NAME} nor {SINGLE_NAME}")
    with safe_open(str(single), framework="pt") as f:  # reads the header only
        return dict.fromkeys(f.keys(), SINGLE_NAME)


def tensors_by_block(names: dict[str, str], pattern: re.Pattern[str]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for name in names:
        if m := pattern.match(name):
            out.setdefault(int(m.group(1)), []).append(name)
    return out


class SafetensorsBlocks:
    """Reads single blocks out of a (possibly sharded) safetensors checkpoint, opening each
    shard lazily with `safe_open` and copying out only the requested tensors."""

    def __init__(self, directory: Path, pattern: re.Pattern[str], stats: LoadStats) -> None:
        self._dir = directory
        self._shards = shard_map(directory)
        self._blocks = tensors_by_block(self._shards, pattern)
        self._stats = stats
        self._open: dict[str, Any] = {}
        self._stack = ExitStack()

    def shards_for(self, blocks: range) -> set[str]:
        return {self._shards[n] for b in blocks for n in self._blocks.get(b, [])}

    def read_block(self, block: int) -> dict[str, torch.Tensor]:
        names = self._blocks.get(block)
        if not names:
            raise ValueError(f"{self._dir} holds no tensors for block {block}")
        out = {}
        for name in names:
            shard = self._shards[name]
            if shard not in self._open:
                path = str(self._dir / shard)
                self._open[shard] = self._stack.enter_context(safe_open(path, framework="pt"))
                self._stats.files.append(shard)
            tensor = self._open[shard].get_tensor(name)
            self._stats.tensors.append(name)
            self._stats.bytes_read += tensor.numel() * tensor.element_size()
            out[name] = tensor
        return out

    def close(self) -> None:
        self._stack.close()
        self._open.clear()


class GGUFBlocks:
    """Reads single blocks out of a GGUF file. The file is memory-mapped (`petald.gguf_file`);
    only tensors named `blk.N.*` (the GGUF standard names for block N) are dequantized, then
    reshaped by transformers' own per-architecture processor (e.g. undoing llama.cpp's Q/K
    permutation) and renamed to the model's parameter names with transformers' GGUF name map."""

    def __init__(self, path: Path, meta_model: PreTrainedModel, stats: LoadStats) -> None:
        self._file = GGUFFile(path)
        config = meta_model.config
        self._processor = gguf_processor(self._file.architecture, config)
        names = list(meta_model.state_dict())  # meta tensors: names only
        self._names = gguf_names(names, meta_model.base_model_prefix, self._processor, config)
        self._stats = stats
        stats.files.append(path.name)
        # The metadata (the tokenizer's arrays) is no longer needed: free it before the weights.
        self._file.metadata.clear()
        self._blocks: dict[int, list[GGUFTensor]] = {}
        for tensor in self._file.tensors.values():
            if m := re.match(r"^blk\.(\d+)\.", tensor.name):
                self._blocks.setdefault(int(m.group(1)), []).append(tensor)

    def read_block(self, block: int) -> dict[str, torch.Tensor]:
        if block not in self._blocks:
            raise ValueError(f"the GGUF file holds no tensors for block {block}")
        parsed: dict[str, Any] = {"tensors": {}}
        out = {}
        for tensor in self._blocks[block]:
            weights = self._file.dequantize(tensor)
            self._stats.tensors.append(tensor.name)
            self._stats.bytes_read += self._file.raw(tensor).nbytes
            result = self._processor.process(
                weights=weights,
                name=tensor.name,
                tensor_key_mapping=self._names,
                parsed_parameters=parsed,
            )
            if result.name in self._names:
                out[self._names[result.name]] = torch.from_numpy(result.weights.copy())
        # MoE processors store merged expert tensors here themselves, already under HF names.
        out.update(parsed["tensors"])
        return out

    def close(self) -> None:
        self._blocks.clear()
        self._file.close()
