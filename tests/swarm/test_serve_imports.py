"""The daemon process of `petald serve` never loads torch or transformers (issue 14): it checks
tensor frames from their headers and passes them on; only its compute process holds the model.
Checked on a real server once it is online, from /proc: the daemon maps no torch library, while
its compute process does (the check can see it). transformers is pure Python (nothing mapped),
so a second test imports every module of the daemon's serve path in a fresh interpreter and
looks at sys.modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from petald.testing import Processes
from petald.testing.models import save_tiny_llama

pytestmark = pytest.mark.slow


def mapped_files(pid: int) -> set[str]:
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {line.split(maxsplit=5)[5] for line in lines if len(line.split(maxsplit=5)) == 6}


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def loaded(pid: int, package: str) -> bool:
    """Whether `package` (torch: its shared libraries) is mapped into process `pid`."""
    return any(f"/{package}/" in path for path in mapped_files(pid))


def test_daemon_imports_no_torch(tmp_path: Path, procs: Processes) -> None:
    save_tiny_llama(tmp_path / "tiny", layers=2)
    server = procs.start(
        "serve",
        str(tmp_path / "tiny"),
        "--blocks",
        "0:2",
        "--new-swarm",
        "--throughput",
        "100",
        "--reachability",
        "public",
        identity=tmp_path / "server.key",
        ready_timeout=120,
    )
    daemon = server.proc.pid
    (worker,) = children(daemon)
    assert loaded(worker, "torch"), "the check must see torch where it is loaded"
    assert not loaded(daemon, "torch"), "the daemon process loaded torch"


DAEMON_MODULES = (
    "petald.cli",
    "petald.cli.serve",
    "petald.daemon",
    "petald.server.executor",
    "petald.server.handlers",
    "petald.server.inference",
    "petald.server.model_config",
    "petald.server.service",
    "petald.stack",
)


def test_daemon_modules_import_no_torch_or_transformers() -> None:
    code = f"import sys\nfor m in {DAEMON_MODULES!r}: __import__(m)\n"
    code += "print(sorted({m.partition('.')[0] for m in sys.modules} & {'torch', 'transformers'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_serve_flags_parse_before_libp2p_is_imported() -> None:
    """`petald serve` spawns its compute process (which then spends seconds importing torch and
    loading) as soon as its flags are parsed; py-libp2p's import (~2 s) must come after, in
    parallel. Catches: a module on the flag-parsing path (petald.cli, cli.serve, server.allow,
    wire.protocols) importing libp2p at module level, as server.allow once did."""
    code = (
        "import sys\nimport petald.cli as c\n"
        "c._parser().parse_args(['serve', 'm', '--blocks', '0:2', '--allow-peers', "
        "'12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo'])\n"
        "print(sorted(m for m in sys.modules if m.partition('.')[0] in ('libp2p', 'torch')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
