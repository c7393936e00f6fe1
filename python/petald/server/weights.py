"""Weight hashes: a digest of each served block's weights, computed at load (`load_span` calls
`block_hash` on each block as it is materialized) and announced in `ServerInfo.weight_hashes`,
so that a client can refuse servers whose weights differ from what the swarm or a trusted list
says (petald.client.trust). `petald weights-hash MODEL` prints the same digests (`span_hashes`)
for a trusted list.

What is hashed: the block's state dict as the server computes with it, in its serving dtype and
before quantization: every tensor by name in sorted order, each as its name, dtype, shape and
raw little-endian bytes (row-major, contiguous), with BLAKE2b-128 from hashlib. Cost: ~0.3 s
of CPU per 100 MB on one core (SmolLM2-135M's 30 blocks in float32, 425 MB: ~1.3 s), next to
reading the weights. xxhash would be faster but is not in the standard library and lets anyone
craft collisions; MD5 and SHA-1 are faster in hashlib but broken.

Why before quantization: int8/nf4 results depend on the bitsandbytes version and device, so
two honest servers of one checkpoint would differ; the quantization is announced beside the
hashes (`ServerInfo.quant`). Why the serving dtype: it is what the server computes with, so
servers of one checkpoint and dtype announce equal hashes, whatever format (safetensors shards,
GGUF) they loaded it from, exactly when the tensors are equal bit for bit. Non-persistent
buffers (rotary frequencies) are computed by code and not hashed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from petald.types import WEIGHT_HASH_BYTES, BlockRange

# Tensors are hashed in slices of at most this many bytes: the copy to the CPU (and to a byte
# view) of one slice is the only extra memory hashing takes.
CHUNK_BYTES = 64 * 2**20


def block_hash(block: nn.Module | dict[str, torch.Tensor]) -> bytes:
    """The 16-byte digest of one block's weights (a module's state dict, or a state dict)."""
    state = block.state_dict() if isinstance(block, nn.Module) else block
    h = hashlib.blake2b(digest_size=WEIGHT_HASH_BYTES, person=b"petald-weights1")
    for name in sorted(state):
        t = state[name].detach()
        header = f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0"
        h.update(header.encode())
        flat = t.reshape(-1)  # a view when contiguous; a row-major copy otherwise
        step = max(1, CHUNK_BYTES // max(1, t.element_size()))
        for i in range(0, flat.numel(), step):
            part = flat[i : i + step].to("cpu").contiguous()
            # Raw bytes whatever the dtype (numpy has no bfloat16): a uint8 view of the storage,
            # hashed through the buffer protocol (no copy).
            h.update(part.view(torch.uint8).numpy())
    return h.digest()


def span_hashes(
    source: str | Path, blocks: BlockRange | None = None, *, dtype: str = "auto"
) -> tuple[BlockRange, str, list[bytes], float]:
    """Loads blocks `blocks` (default: all) of `source` as `petald serve` would and returns
    (the blocks, the serving dtype, their hashes, CPU seconds spent hashing)."""
    from petald.server.loading import load_span, read_config

    if blocks is None:
        blocks = BlockRange(0, int(read_config(source).num_hidden_layers))
    span = load_span(source, blocks, dtype=dtype, progress=False)
    dtype_name = str(span.dtype).removeprefix("torch.")
    return blocks, dtype_name, list(span.weight_hashes), span.hash_seconds
