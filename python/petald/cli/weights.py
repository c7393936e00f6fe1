"""`petald weights-hash MODEL [--blocks A:B] [--dtype D] [-o FILE]`: the weight hashes servers of
MODEL announce (petald.server.weights), as the trusted weights file a client reads with
`--trusted-weights FILE` (petald.client.trust). It loads the blocks as `petald serve` does (one
at a time, in the serving dtype) and prints the time hashing took."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="model directory, .gguf file or Hub id")
    p.add_argument(
        "--blocks", metavar="START:END", help="only these blocks (default: all of the model's)"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="the dtype the servers serve in (hashes differ per dtype; default: auto, the "
        "checkpoint's, as `petald serve` picks it)",
    )
    p.add_argument(
        "--model-name", help="the name servers announce the model under (default: from MODEL)"
    )
    p.add_argument(
        "-o", "--output", type=Path, help="write the file here (default: standard output)"
    )


def run(args: argparse.Namespace) -> int:
    from petald.client.trust import TrustedWeights
    from petald.server.weights import span_hashes
    from petald.types import BlockRange

    blocks = BlockRange.parse(args.blocks) if args.blocks else None
    t0 = time.perf_counter()
    span, dtype, hashes, seconds = span_hashes(args.model, blocks, dtype=args.dtype)
    name = args.model_name or Path(str(args.model)).name.removesuffix(".gguf")
    text = TrustedWeights.dumps(name, span, dtype, hashes)
    if args.output is not None:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    print(
        f"blocks {span} in {dtype}: loaded and hashed in {time.perf_counter() - t0:.1f} s, "
        f"of which hashing {seconds:.2f} s of CPU",
        file=sys.stderr,
    )
    return 0
