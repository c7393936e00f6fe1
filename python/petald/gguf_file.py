"""GGUF checkpoint files, read without the `gguf` package's reader: that reader builds a numpy view
per metadata element, so the header of a file with a 49k-token vocabulary cost ~4 s of CPU, and
a server paid it twice (config, then tensors) before loading a single weight. Here the header is
parsed by the Rust core (`petald._native.gguf_index`, milliseconds) from an mmap of the file, and
tensor bytes are numpy views into that mmap, laid out exactly as the `gguf` package lays them out
so that its public `dequantize` and transformers' tensor processors take them as they are. The
common block formats are dequantized by the Rust core too (`GGUFFile.dequantize`).

The model config still comes from transformers (its GGUF-to-config mapping is per architecture
and not ours to copy), once per file and transformers version: `gguf_config` caches it as a
config.json in `petald.cache.cache_dir()`, like the tokenizer (`petald.cli.tokenizer`).

Entry points: `GGUFFile(path)` (a context manager), `gguf_config(path)`."""

from __future__ import annotations

import contextlib
import math
import mmap
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from petald._native import GGUF_DEQUANT_TYPES, gguf_dequantize, gguf_index
from petald.cache import gguf_entry, save_pretrained_entry
from petald.errors import GGUFError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# ggml types stored as plain arrays (gguf's reader gives them their numpy dtype); every other
# type is a quantized block format, handed to `gguf.dequantize` as bytes.
_PLAIN = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64}
_PLAIN[28] = np.float64


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    ggml_type: int
    dims: tuple[int, ...]  # GGUF order: innermost first
    offset: int  # absolute, in bytes


class GGUFFile:
    """An open GGUF file: `metadata` (key -> value), `tensors` (name -> GGUFTensor) and
    `raw(tensor)`, the tensor's bytes as the numpy array `gguf.dequantize` takes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError as e:  # an empty file cannot be mapped
                raise GGUFError(f"{self.path} is not a GGUF file: {e}") from None
        try:
            _, self.metadata, tensors, self.data_start = gguf_index(self._map)
        except GGUFError as e:
            self.close()
            raise GGUFError(f"{self.path}: {e}") from None
        self.tensors = {t[0]: GGUFTensor(t[0], t[1], tuple(t[2]), t[3]) for t in tensors}

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path} has no general.architecture")
        return arch

    def raw(self, tensor: GGUFTensor) -> np.ndarray:
        """A read-only view of the tensor's bytes (no copy): a plain type as its numpy dtype in
        numpy's dimension order, a quantized one as uint8 rows of whole blocks."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quant_shape_to_byte_shape

        try:
            qtype = GGMLQuantizationType(tensor.ggml_type)
            block_size, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise GGUFError(f"{tensor.name}: unknown ggml type {tensor.ggml_type}") from None
        n_elems = math.prod(tensor.dims)
        shape = tuple(reversed(tensor.dims))
        if tensor.ggml_type in _PLAIN:
            dtype, count = np.dtype(_PLAIN[tensor.ggml_type]), n_elems
        else:
            if n_elems % block_size:
                raise GGUFError(f"{tensor.name}: {n_elems} elements are not whole blocks")
            dtype, count = np.dtype(np.uint8), n_elems // block_size * type_size
            shape = quant_shape_to_byte_shape(shape, qtype)
        if tensor.offset + count * dtype.itemsize > len(self._map):
            raise GGUFError(f"{self.path}: tensor {tensor.name} lies past the end of the file")
        return np.frombuffer(self._map, dtype, count, tensor.offset).reshape(shape)

    def dequantize(self, tensor: GGUFTensor) -> np.ndarray:
        """The tensor as float32 (a plain type: as stored), in numpy's dimension order, as
        `gguf.dequantize` returns it. Q4_0, Q4_1 and Q8_0 go through the Rust core (bit for
        bit the same values, ~20x faster than gguf's numpy code), other types through gguf."""
        raw = self.raw(tensor)
        if tensor.ggml_type in GGUF_DEQUANT_TYPES:
            out = np.frombuffer(gguf_dequantize(tensor.ggml_type, raw), np.float32)
            return out.reshape(tuple(reversed(tensor.dims)))
        from gguf import dequantize

        return dequantize(raw, tensor.ggml_type)

    def close(self) -> None:
        # A view handed out may still be alive: then the mapping is freed with it.
        with contextlib.suppress(BufferError):
            self._map.close()

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def gguf_config(path: str | Path, **kwargs: Any) -> PretrainedConfig:
    """transformers' config of the GGUF file at `path`, from the cache when it was read before
    (keyed by the file's name, size and mtime and the transformers version)."""
    from transformers import AutoConfig

    path = Path(path)
    cached = gguf_entry("gguf-configs", path)
    if (cached / "config.json").is_file():
        try:
            config = AutoConfig.from_pretrained(str(cached), **kwargs)
            config._name_or_path = str(path.parent)  # as transformers names a GGUF's config
            return config
        except (OSError, ValueError):  # a damaged entry: read again below, and replaced
            shutil.rmtree(cached, ignore_errors=True)
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
    save_pretrained_entry(config, cached)
    return config
