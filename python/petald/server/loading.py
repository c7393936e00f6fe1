"""Loading a span of a model's transformer blocks: the first half of `petald serve MODEL
--blocks 20:40`. Entry point: `load_span(source, blocks)`. It reads the config, instantiates the
whole model on the meta device (no memory: this is how the family's own decoder layer classes and
their layout are found), reads only the span's tensors from the checkpoint, runs them through
transformers' own checkpoint conversions (e.g. Mixtral's per-expert weights fused into one tensor)
and assigns them into the meta layers, which become real. Nothing outside the span — other
layers, embeddings, the LM head — is ever read or allocated: the meta model is kept only to run
the family's own forward around the served layers (`petald.server.families.Runner`), and a probe
call refuses, at load, a family whose layers are not self-contained blocks.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import nn
from tqdm.auto import tqdm  # type: ignore[import-untyped]
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from petald.gguf_file import gguf_config
from petald.hf_internals import (
    causal_lm_model_types,
    convert_block_tensors,
    rebuild_non_persistent_buffers,
)
from petald.notify import notifier
from petald.server.blocks import Span
from petald.server.checkpoint import (
    CONFIG_NAME,
    INDEX_NAME,
    SINGLE_NAME,
    GGUFBlocks,
    LoadStats,
    Located,
    SafetensorsBlocks,
    block_key_pattern,
    hub_snapshot,
    locate,
    shard_map,
    tensors_by_block,
)
from petald.server.families import Family, Runner, family_for
from petald.server.quant import QuantStats, check_quant, quantize, require_kernels
from petald.server.weights import block_hash
from petald.types import BlockRange

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _BlockReader(Protocol):
    def read_block(self, block: int) -> dict[str, torch.Tensor]: ...
    def close(self) -> None: ...


def load_span(
    source: str | Path,
    blocks: BlockRange | range | tuple[int, int],
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    progress: bool = True,
    quant: str = "none",
) -> Span:
    """Load blocks [start, end) of the model at `source` (a HF model directory, a .gguf file or
    a Hub repo id) onto `device`. `dtype="auto"` keeps the checkpoint's dtype (float32 for GGUF,
    which is dequantized). `quant` ("none", "int8" or "nf4", see `petald.server.quant`) stores
    the blocks' Linear weights quantized, each block as soon as it is loaded; the rest of the
    computation stays in `dtype`."""
    start, end = _bounds(blocks)
    wanted = _parse_dtype(dtype)
    check_quant(quant)
    where = locate(source)
    directory = None
    if where.kind == "hub":  # the config and index first, to learn which shards hold the span
        directory = hub_snapshot(where.repo_id, [CONFIG_NAME, INDEX_NAME])
    config = _config(where, directory)
    total = config.num_hidden_layers
    if end > total:
        raise ValueError(f"blocks {start}:{end} are out of range: the model has {total} blocks")
    torch_dtype = wanted or _auto_dtype(config, where)
    torch_device = torch.device(device)
    require_kernels(quant, torch_device, torch_dtype)  # before reading gigabytes of weights
    meta = _meta_model(config, torch_dtype)
    family = family_for(meta)
    pattern = block_key_pattern(family.layers_path, meta.base_model_prefix)
    stats = LoadStats()
    reader: _BlockReader
    if where.kind == "gguf":
        reader = GGUFBlocks(where.path, meta, stats)
    else:
        if directory is not None:  # the Hub: now fetch only the shards that hold the span
            directory = hub_snapshot(where.repo_id, _hub_patterns(directory, pattern, start, end))
        reader = SafetensorsBlocks(directory or where.path, pattern, stats)
    convert = where.kind != "gguf"  # GGUF names are mapped straight to the model's own names
    layers = cast(nn.ModuleList, meta.get_submodule(family.layers_path))  # family_for checked
    served = list(layers[start:end])  # still on meta: their weights are assigned in place
    quant_stats = QuantStats()
    hashes: list[bytes] = []  # announced: petald.server.weights says what and why
    hash_seconds = 0.0
    try:
        bar = tqdm(range(start, end), desc=f"loading blocks {start}:{end}", disable=not progress)
        for i in bar:
            raw = reader.read_block(i)
            state = convert_block_tensors(meta, raw) if convert else raw
            block = _materialize(meta, i, state, family, torch_dtype, torch_device)
            t0 = time.thread_time()  # CPU time: what hashing costs, whatever else runs
            hashes.append(block_hash(block))  # before quantization
            hash_seconds += time.thread_time() - t0
            if quant != "none":  # now, so that at most one block is ever held unquantized
                quant_stats += quantize(block, quant)
            bar.set_postfix(read=f"{stats.bytes_read / 2**20:.0f} MiB")
            # systemd's STATUS line, through the daemon (a no-op unless under Type=notify)
            notifier().status(f"loading blocks {start}:{end}: {i + 1 - start}/{end - start}")
    finally:
        reader.close()
    if quant != "none":
        _log_quant(quant, start, end, quant_stats)
    # The runner takes the meta model over: its layer list becomes proxies of the served layers.
    runner = Runner(family, served, start, torch_dtype, torch_device)
    span_range = BlockRange(start, end)
    span = Span(runner, span_range, nn.ModuleList(served), torch_dtype, torch_device, stats, quant)
    span.weight_hashes, span.hash_seconds = tuple(hashes), hash_seconds
    log.info("hashed the weights of blocks %d:%d: %.2f s of CPU", start, end, hash_seconds)
    span.probe()  # refuses a family whose forward does not treat its layers as blocks
    return span


def _log_quant(quant: str, start: int, end: int, s: QuantStats) -> None:
    mib_before, mib_after = s.bytes_before / 2**20, s.bytes_after / 2**20
    log.info(
        "blocks %d:%d in %s: %d Linear layers quantized, parameters and buffers "
        "%.1f MiB -> %.1f MiB; "
        "%d parameters stay unquantized (norms, routers, fused MoE experts)",
        start,
        end,
        quant,
        s.replaced,
        mib_before,
        mib_after,
        s.kept_params,
    )


def _bounds(blocks: BlockRange | range | tuple[int, int]) -> tuple[int, int]:
    if isinstance(blocks, range):
        if blocks.step != 1:
            raise ValueError(f"blocks {blocks} must be contiguous (step 1)")
        start, end = blocks.start, blocks.stop
    elif isinstance(blocks, BlockRange):
        start, end = blocks.start, blocks.end
    else:
        start, end = blocks
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end):
        raise ValueError(f"bad block range {start}:{end}; need 0 <= start < end, e.g. 20:40")
    return start, end


def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype | None:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype == "auto":
        return None
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")


def read_config(source: str | Path) -> PretrainedConfig:
    """The model's config alone (e.g. to learn its number of blocks before choosing a span)."""
    where = locate(source)
    directory = hub_snapshot(where.repo_id, [CONFIG_NAME]) if where.kind == "hub" else None
    return _config(where, directory)


def _config(where: Located, hub_dir: Path | None) -> PretrainedConfig:
    if where.kind == "gguf":
        config = gguf_config(where.path)
    else:
        config = AutoConfig.from_pretrained(str(hub_dir or where.path))
    if config.model_type not in causal_lm_model_types():
        raise ValueError(
            f"unsupported architecture: model_type {config.model_type!r} is not a causal LM "
            "that the installed transformers knows"
        )
    if not isinstance(getattr(config, "num_hidden_layers", None), int):
        raise ValueError(
            f"unsupported architecture: a {config.model_type!r} config has no number of layers "
            "(a model that wraps others: serve its text model)"
        )
    return config


def _auto_dtype(config: PretrainedConfig, where: Located) -> torch.dtype:
    declared = getattr(config, "dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    if where.kind == "gguf" or not isinstance(declared, torch.dtype):
        return torch.float32
    return declared if declared in DTYPES.values() else torch.float32


def _meta_model(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    # On the meta device a 70B model costs no memory; we only borrow its layer objects. In eval
    # mode: its base forward runs for every call (petald.server.families), and in training mode
    # its dropouts would draw random numbers (GPT-2 drops out the embeddings it is handed).
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def _hub_patterns(directory: Path, pattern: Any, start: int, end: int) -> list[str]:
    if not (directory / INDEX_NAME).is_file():
        return [CONFIG_NAME, SINGLE_NAME]
    names = shard_map(directory)
    by_block = tensors_by_block(names, pattern)
    shards = {names[n] for b in range(start, end) for n in by_block.get(b, [])}
    return [CONFIG_NAME, INDEX_NAME, *sorted(shards)]


def _materialize(
    meta: PreTrainedModel,
    block: int,
    weights: dict[str, torch.Tensor],
    family: Family,
    dtype: torch.dtype,
    device: torch.device,
) -> nn.Module:
    layer = meta.get_submodule(f"{family.layers_path}.{block}")
    # Buffers that no checkpoint holds (e.g. a rotary embedding inside attention) are computed
    # by the family's own code, while the parameters are still on meta.
    rebuild_non_persistent_buffers(meta, device, within=layer)
    prefix = f"{family.layers_path}.{block}."
    state = {
        k.removeprefix(prefix): v.to(device=device, dtype=dtype)
        for k, v in weights.items()
        if k.startswith(prefix)
    }
    try:
        layer.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"block {block}: the checkpoint does not match the config: {e}") from None
    tensors = [*layer.named_parameters(), *layer.named_buffers()]
    if leftover := [name for name, t in tensors if t.is_meta]:
        raise ValueError(f"unsupported architecture: block {block} keeps unloaded state {leftover}")
    layer.eval()
    layer.requires_grad_(False)  # servers need input gradients, never weight gradients
    return layer
