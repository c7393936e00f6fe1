"""Regenerates the committed Python code for petald's protobuf schemas (proto/petald/v1/*.proto)
into python/petald/wire/pb/: `<name>_pb2.py` from protoc and `<name>_pb2.pyi` from mypy-protobuf.
Entry point: `python proto/generate.py [--out DIR]` (`just proto`); the drift test calls it with
a temporary `--out` and compares the bytes with the committed files.

Determinism: protoc is the one bundled with the pinned grpcio-tools (not whatever is on PATH),
the mypy plugin is the pinned mypy-protobuf from this interpreter's environment, and schemas are
passed relative to proto/ so no absolute path reaches the output."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
DEFAULT_OUT = REPO_ROOT / "python" / "petald" / "wire" / "pb"

# Schema (relative to proto/) -> module stem in python/petald/wire/pb. Flat output: the
# descriptor keeps the full "petald/v1/kad.proto" name (unique in the global pool), but the
# import path stays short.
SCHEMAS = {"petald/v1/kad.proto": "kad"}


def generate(out_dir: Path) -> list[Path]:
    """Writes `<stem>_pb2.py` and `<stem>_pb2.pyi` for every schema into `out_dir`."""
    plugin = Path(sys.executable).parent / "protoc-gen-mypy"
    if not plugin.exists():
        raise SystemExit(f"{plugin} is missing: install the dev dependencies (just setup)")
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "--proto_path=.",
            f"--plugin=protoc-gen-mypy={plugin}",
            f"--python_out={tmp}",
            f"--mypy_out={tmp}",
            *SCHEMAS,
        ]
        subprocess.run(cmd, cwd=PROTO_ROOT, check=True)
        for schema, stem in SCHEMAS.items():
            generated = Path(tmp) / Path(schema).parent
            for suffix in (".py", ".pyi"):
                src = generated / f"{Path(schema).stem}_pb2{suffix}"
                dst = out_dir / f"{stem}_pb2{suffix}"
                shutil.copyfile(src, dst)
                written.append(dst)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)


if __name__ == "__main__":
    main()
