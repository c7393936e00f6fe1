"""Quantizing a loaded span's weights with bitsandbytes: `petald serve --quant int8|nf4`. Entry
points: `require_kernels(mode, device, dtype)` before any weight is read (it fails fast, with a
ValueError, on a bad mode or a device the installed bitsandbytes cannot quantize on), then
`quantize(module, mode)` on each block as soon as it is materialized, so that the unquantized span
never exists in memory all at once.

Every `nn.Linear` in a block becomes a bitsandbytes `Linear8bitLt` (LLM.int8(), Dettmers et al.
2022: int8 weights with per-row scales, multiplied in float16; activation columns above the 6.0
outlier threshold take a 16-bit path) or `Linear4bit` with NF4 (QLoRA, Dettmers et al. 2023: 4-bit
NormalFloat in blocks of 64 with double-quantized scales, computing in the span's dtype).
Everything else stays in the span's dtype: norms, routers, and MoE experts that transformers
stores as fused 3D parameters (e.g. Mixtral's `experts.gate_up_proj`), which no bitsandbytes
Linear can hold. Quantization runs on the weights' own device, so the same code serves CUDA and
CPU (bitsandbytes 0.50, the version tested, has CPU kernels for both modes; on CPUs with
AVX512-BF16, NF4 layers of shapes its fused kernel cannot hold are kept off that kernel).
"""

from __future__ import annotations

import functools
import logging
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

QUANT_MODES = ("none", "int8", "nf4")
INT8_THRESHOLD = 6.0  # LLM.int8()'s outlier threshold, the paper's and transformers' default
NF4_BLOCKSIZE = 64  # QLoRA's block size: one absmax scale per 64 weights
# On a CPU with AVX512-BF16, bitsandbytes (since 0.49, its PR #1804) repacks a Linear4bit's weight
# for its fused CPU kernel on the first inference forward: tiles of 32 output rows, the absmax
# scales reshaped to (out_features, in_features // blocksize). It neither checks nor falls back,
# so other shapes fail there (96 -> 64: "shape '[64, 1]' is invalid for input of size 96"), and
# has no backward; `_quantized` keeps every layer on the generic CPU path (dequantize, then
# matmul), as on other CPUs.


@dataclass
class QuantStats:
    """What `quantize` did: Linear layers replaced, parameters left in the span's dtype, and the
    bytes of parameters, buffers and quantization scales before and after."""

    replaced: int = 0
    kept_params: int = 0
    bytes_before: int = 0
    bytes_after: int = 0

    def __add__(self, other: QuantStats) -> QuantStats:
        return QuantStats(
            self.replaced + other.replaced,
            self.kept_params + other.kept_params,
            self.bytes_before + other.bytes_before,
            self.bytes_after + other.bytes_after,
        )


def check_quant(mode: str) -> None:
    """Raise ValueError unless `mode` is one of QUANT_MODES."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quant mode {mode!r}; use one of {', '.join(QUANT_MODES)}")


def require_kernels(mode: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise ValueError unless the installed bitsandbytes can quantize to `mode` and multiply on
    `device` in `dtype` (a no-op for `none`)."""
    check_quant(mode)
    if mode != "none":
        _probe(mode, str(device), dtype)


def quantize(module: nn.Module, mode: str) -> QuantStats:
    """Replace every `nn.Linear` inside `module` (a decoder block, or a list of them) in place."""
    check_quant(mode)
    before = state_bytes(module)
    if mode == "none":
        return QuantStats(0, sum(p.numel() for p in module.parameters()), before, before)
    linears = [(n, m) for n, m in module.named_modules() if _is_plain_linear(m)]
    for name, linear in linears:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        setattr(parent, child, _quantized(linear, mode))
    bnb = _bnb()
    kept = sum(
        p.numel()
        for p in module.parameters()
        if not isinstance(p, bnb.nn.Int8Params | bnb.nn.Params4bit)
    )
    return QuantStats(len(linears), kept, before, state_bytes(module))


def state_bytes(module: nn.Module) -> int:
    """Bytes of the parameters, buffers and bitsandbytes scales of `module`, each tensor counted
    once (an int8 weight is also referenced as its `CB`)."""
    seen: dict[tuple[torch.device, int], int] = {}
    for t in [*module.parameters(), *module.buffers(), *_scales(module)]:
        seen[(t.device, t.data_ptr())] = t.numel() * t.element_size()
    return sum(seen.values())


def _is_plain_linear(m: nn.Module) -> bool:
    # FalconLinear subclasses nn.Linear with the same maths; bitsandbytes' own classes do too,
    # and must not be quantized twice.
    if not isinstance(m, nn.Linear):
        return False
    bnb = _bnb()
    return not isinstance(m, bnb.nn.Linear8bitLt | bnb.nn.Linear4bit)


def _quantized(linear: nn.Linear, mode: str) -> nn.Module:
    bnb = _bnb()
    weight = linear.weight.detach()  # (out_features, in_features), on the span's device
    has_bias = linear.bias is not None
    new: Any
    # Built on the meta device: the layer's own random init would allocate a full weight.
    if mode == "int8":
        new = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            has_fp16_weights=False,
            threshold=INT8_THRESHOLD,
            device="meta",
        )
        # Quantized here rather than by `Int8Params.to(device)`, which only quantizes weights
        # that are still on the CPU; this works on the weight's own device, whatever it is.
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
        new.weight = bnb.nn.Int8Params(
            cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb
        )
    else:
        new = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=weight.dtype,
            quant_type="nf4",
            device="meta",
        )
        packed, state = bnb.functional.quantize_4bit(
            weight, blocksize=NF4_BLOCKSIZE, compress_statistics=True, quant_type="nf4"
        )
        new.weight = bnb.nn.Params4bit(
            packed,
            requires_grad=False,
            quant_state=state,
            blocksize=NF4_BLOCKSIZE,
            compress_statistics=True,
            quant_type="nf4",
            module=new,
            bnb_quantized=True,
        )
        new.quant_state = state
        # Never the repacked CPU path (read by Linear4bit.forward, see above): besides the shapes
        # it cannot take, the kernel it then calls for every forward, grad or not, has no
        # backward (bitsandbytes warns "gemv_4bit: an autograd kernel was not registered"), so
        # after one inference step a backward through the span silently skipped the quantized
        # layers (input gradient = the residual's; test_quant on an AVX512-BF16 CPU).
        new.support_avx512bf16_for_cpu = False
    if has_bias:
        new.bias = linear.bias  # kept in the span's dtype; already frozen by the loader
    new.train(linear.training)
    return new


def _scales(module: nn.Module) -> list[torch.Tensor]:
    """The quantization state bitsandbytes keeps outside parameters and buffers."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:  # never imported, so nothing was quantized (and `none` stays import-free)
        return []
    out: list[torch.Tensor] = []
    for m in module.modules():
        if isinstance(m, bnb.nn.Linear8bitLt):
            # SCB moves from the weight to `state` on the first forward.
            out += [t for t in (getattr(m.weight, "SCB", None), m.state.SCB) if t is not None]
        elif isinstance(m, bnb.nn.Linear4bit) and m.weight.quant_state is not None:
            state = m.weight.quant_state.as_dict()
            out += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return out


@functools.cache
def _probe(mode: str, device: str, dtype: torch.dtype) -> None:
    """Quantize and run one small layer on `device`, so that a device or dtype the installed
    bitsandbytes has no kernels for is refused before gigabytes of weights are read."""
    linear = nn.Linear(NF4_BLOCKSIZE, NF4_BLOCKSIZE, device=device, dtype=dtype)
    x = torch.ones(1, NF4_BLOCKSIZE, device=device, dtype=dtype)
    try:
        with torch.no_grad():
            _quantized(linear, mode)(x)
    except (NotImplementedError, RuntimeError) as e:
        version = _bnb().__version__
        raise ValueError(
            f"quant {mode} does not run on {device} in {dtype} with bitsandbytes {version} "
            f"({type(e).__name__}: {e}); it runs on CUDA, and on CPU with bitsandbytes 0.50: "
            "use one of those, or serve unquantized (quant none)"
        ) from e


@functools.cache
def _bnb() -> Any:
    # Imported on first use: bitsandbytes is the optional `petald[quant]` extra, and importing
    # it costs seconds that `--quant none` should not pay.
    try:
        import bitsandbytes  # its __init__ imports .nn and .functional, used above
    except ImportError as e:
        raise ValueError(
            f"quantization needs bitsandbytes ({e}): pip install 'petald[quant]'"
        ) from None
    # LLM.int8() multiplies in float16 by design, and bitsandbytes logs a warning saying so on
    # every int8 matmul of a bfloat16 or float32 input: each Linear call of every request.
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_not_cast_warning)
    return bitsandbytes


def _not_cast_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")
