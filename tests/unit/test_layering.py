"""Imports point one way (shared/STYLE.md §1): types/errors <- wire <- p2p <- dht <- {server,
client} <- models <- daemon <- cli; `stack` sits with dht (it only assembles p2p and dht
services, and servers and clients both start one). A module may import its own layer and lower
ones; `client` never imports `server` and vice versa. Checked on the source with `ast`, so a new
upward import fails here before it becomes a cycle."""

import ast
from pathlib import Path

import petald

ROOT = Path(petald.__file__).parent
LAYERS = {
    "errors": 0,
    "types": 0,
    "_native": 0,
    "notify": 0,  # the systemd notify protocol: stdlib and trio only, used from server up
    "wire": 1,
    "p2p": 2,
    "dht": 3,
    "server": 4,
    "client": 4,
    "models": 5,
    "stack": 3,  # assembles p2p and dht services; servers and clients both start one
    "web": 3,  # HTTP serving, the health page, latency probes (over p2p)
    "metrics": 3,  # a daemon's Prometheus registry; servers meter their requests into it
    "daemon": 6,
    "cli": 7,
    "testing": 7,
    "__init__": 7,
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_imports_point_down() -> None:
    bad = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        own = rel.parts[0]
        if own not in LAYERS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module == "petald":
                # `from petald import _native` names a submodule; `__version__` is metadata.
                names = [f"petald.{a.name}" for a in node.names if a.name != "__version__"]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if not name.startswith("petald.") and name != "petald":
                    continue
                target = layer_of(name)
                if target not in LAYERS:
                    continue
                if own == "__init__" or target == own:
                    continue
                upward = LAYERS[target] > LAYERS[own]
                sideways = {own, target} == {"server", "client"}
                if upward or sideways:
                    bad.append(f"{rel}: imports {name}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)
