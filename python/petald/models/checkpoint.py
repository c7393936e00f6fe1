"""Reading the client's share of a checkpoint: the config, and the tensors that are not in any
transformer block (embeddings, final norm, LM head), without touching a block's weights. The
sources are those `petald serve MODEL` accepts: a Hugging Face model directory (safetensors,
sharded or not), a GGUF file (dequantized; names mapped with transformers' own GGUF tables) or a
Hub repo id (only the config, the index and the shards holding non-block tensors are fetched).
Entry points: `read_config(source)`, `read_local_tensors(source, names, ...)` and
`model_name(source)`, the name servers announce the model under.

The block-reading side lives in `petald.server.checkpoint`, which models/ may not import; the
locating logic is repeated here in its few lines (see the report on moving both to one neutral
module)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from petald.errors import HubUnreachable
from petald.gguf_file import GGUFFile, gguf_config
from petald.hf_internals import gguf_names, gguf_processor

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
HUB_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")  # "name" or "owner/name", as the Hub validates
# Checkpoint keys of block tensors in the layouts petald serves (`model.layers.3.`,
# `transformer.h.3.`, `h.3.`, ...) and GGUF's standard `blk.3.`.
BLOCK_KEY = re.compile(r"^(?:[\w]+\.)?(?:layers|h|blocks|decoder\.layers)\.\d+\.|^blk\.\d+\.")


@dataclass(frozen=True)
class Source:
    kind: str  # "dir", "gguf" or "hub"
    path: Path  # the directory or the GGUF file; empty for the Hub
    repo_id: str = ""


def locate(source: str | Path) -> Source:
    """Which kind of source `source` is (the same rules as `petald serve`)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise ValueError(f"{path} has no {CONFIG_NAME}; pass a Hugging Face model directory")
        return Source("dir", path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path} is not a .gguf file; pass a GGUF file or a model directory")
        return Source("gguf", path)
    text = str(source)
    if text.endswith(".gguf") or text.startswith((".", "/", "~")) or not HUB_ID.match(text):
        raise ValueError(f"{text!r}: no such file or directory (and it is not a Hub repo id)")
    return Source("hub", Path(), repo_id=text)


def model_name(source: str | Path) -> str:
    """The name servers announce `source` under (as `petald.cli.serve.model_name`): a Hub id as
    given, else the directory name or the .gguf file's stem."""
    path = Path(source)
    if path.exists():
        return path.stem if path.suffix == ".gguf" else path.resolve().name
    return str(source)


def _hub(repo_id: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError as e:
        raise HubUnreachable(
            f"{repo_id!r} is no local path, so it was taken for a Hub repo id, but the Hub is "
            f"unreachable and it is not in the local cache ({e}); pass a local model directory "
            "or a .gguf file instead"
        ) from None
    except RepositoryNotFoundError:
        raise ValueError(f"{repo_id!r} is not a model repo on the Hugging Face Hub") from None


def read_config(source: Source) -> PretrainedConfig:
    if source.kind == "gguf":
        return gguf_config(source.path)
    if source.kind == "hub":
        return AutoConfig.from_pretrained(str(_hub(source.repo_id, [CONFIG_NAME])))
    return AutoConfig.from_pretrained(str(source.path))


def config_dir(source: Source) -> Path:
    """Where the config (and a generation_config.json, if any) lies."""
    if source.kind == "hub":
        return _hub(source.repo_id, [CONFIG_NAME, "generation_config.json"])
    return source.path.parent if source.kind == "gguf" else source.path


def read_local_tensors(
    source: Source,
    wanted: list[str],
    base_prefix: str,
    config: PretrainedConfig,
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors named `wanted` (the model's own state-dict names) that the checkpoint holds
    outside its blocks; names it lacks (a tied LM head) are simply absent. `convert` maps
    checkpoint names to the model's where they differ (transformers' renamings, e.g.
    GPT-NeoX's `embed_out` -> `lm_head`); it gets the checkpoint's other non-block tensors."""
    if source.kind == "gguf":
        return _gguf_tensors(source.path, wanted, base_prefix, config)
    directory = source.path
    if source.kind == "hub":
        directory = _hub(source.repo_id, [CONFIG_NAME, INDEX_NAME])
        shards = set(_shard_map(directory, allow_missing=True).values()) or {SINGLE_NAME}
        directory = _hub(source.repo_id, [CONFIG_NAME, INDEX_NAME, *sorted(shards)])
    return _safetensors(directory, wanted, base_prefix, convert)


def _shard_map(directory: Path, *, allow_missing: bool = False) -> dict[str, str]:
    index = directory / INDEX_NAME
    if index.is_file():
        names = json.loads(index.read_text())["weight_map"]
        return {k: v for k, v in names.items() if not BLOCK_KEY.match(k)}
    single = directory / SINGLE_NAME
    if not single.is_file():
        if allow_missing:
            return {}
        raise ValueError(f"{directory} has neither {INDEX_NAME} nor {SINGLE_NAME}")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:  # reads the header only
        names = f.keys()
    return {k: SINGLE_NAME for k in names if not BLOCK_KEY.match(k)}


def _safetensors(
    directory: Path,
    wanted: list[str],
    prefix: str,
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None,
) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    shards = _shard_map(directory)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name in wanted:
        # Checkpoints of the base model say `word_embeddings.weight`, of the LM
        # `transformer.word_embeddings.weight`: both are accepted.
        for key in (name, name.removeprefix(f"{prefix}.")):
            if key in shards:
                with safe_open(str(directory / shards[key]), framework="pt") as f:
                    out[name] = f.get_tensor(key)
                used.add(key)
                break
    rest = [k for k in shards if k not in used]
    if convert is not None and rest and any(n not in out for n in wanted):
        raw = {}
        for key in rest:
            with safe_open(str(directory / shards[key]), framework="pt") as f:
                raw[key] = f.get_tensor(key)
        converted = convert(raw)
        out.update({n: converted[n] for n in wanted if n not in out and n in converted})
    return out


def _gguf_tensors(
    path: Path, wanted: list[str], prefix: str, config: PretrainedConfig
) -> dict[str, torch.Tensor]:
    """Non-block GGUF tensors, dequantized, under the model's names (transformers' GGUF map)."""
    out: dict[str, torch.Tensor] = {}
    with GGUFFile(path) as gguf:
        processor = gguf_processor(gguf.architecture, config)
        names = gguf_names(wanted, prefix, processor, config)
        for tensor in gguf.tensors.values():
            if BLOCK_KEY.match(tensor.name):
                continue  # the servers' business: never dequantized here
            weights = gguf.dequantize(tensor)
            result = processor.process(
                weights=weights, name=tensor.name, tensor_key_mapping=names, parsed_parameters={}
            )
            if result.name in names and names[result.name] in wanted:
                # a copy: a plain-typed tensor's weights are a view of the file's mapping
                out[names[result.name]] = torch.from_numpy(result.weights.copy())
    return out
