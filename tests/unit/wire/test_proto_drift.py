"""The committed generated protobuf code is exactly what `just proto` writes from proto/: this
regenerates into a temporary directory and compares bytes, so CI fails when a .proto changed
without regenerating, when generated code was edited by hand, or when the pinned generator
(grpcio-tools, mypy-protobuf in pyproject's dev extras) changed without regenerating."""

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
COMMITTED = REPO / "python" / "petald" / "wire" / "pb"
GENERATED = ["kad_pb2.py", "kad_pb2.pyi"]


def test_generation_is_deterministic_and_committed(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "proto" / "generate.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == GENERATED
    for name in GENERATED:
        if (tmp_path / name).read_bytes() != (COMMITTED / name).read_bytes():
            pytest.fail(
                f"python/petald/wire/pb/{name} differs from what proto/ generates; run `just proto`"
                f" (generator: grpcio-tools {version('grpcio-tools')},"
                f" mypy-protobuf {version('mypy-protobuf')})"
            )


def test_generated_code_loads_with_the_installed_runtime() -> None:
    # The gencode checks the protobuf runtime version at import; this is where a runtime older
    # than the generator would show up.
    from petald.wire.pb import kad_pb2

    assert kad_pb2.DESCRIPTOR.package == "petald.v1"
    assert kad_pb2.Message.DESCRIPTOR.fields_by_name["clusterLevelRaw"].number == 10
