"""petald's OpenMP settings reach its processes before torch loads (libgomp reads them once, when
it loads), and a user's own setting is kept whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from petald.server.openmp import OPENMP_DEFAULTS, with_openmp_defaults

KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")

# Runs petald's CLI entry point in a fresh interpreter and reports the environment it left for
# itself and its children, and whether torch had been loaded by then (too late if so).
PROBE = """
import contextlib, json, os, sys
import petald.cli
torch_before = "torch" in sys.modules
with contextlib.suppress(SystemExit):
    petald.cli.main(["--version"])
keys = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
print(json.dumps({"torch_before": torch_before, **{k: os.environ.get(k) for k in keys}}))
"""


def cli_env(**user: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in KEYS} | user
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.splitlines()[-1])


def test_cli_sets_defaults_before_torch() -> None:
    got = cli_env()
    assert got.pop("torch_before") is False
    assert got == OPENMP_DEFAULTS


def test_user_setting_is_kept_whole() -> None:
    got = cli_env(OMP_WAIT_POLICY="PASSIVE")
    assert (got["OMP_WAIT_POLICY"], got["GOMP_SPINCOUNT"]) == ("PASSIVE", None)
    assert with_openmp_defaults({"GOMP_SPINCOUNT": "5"}) == {"GOMP_SPINCOUNT": "5"}


def test_compute_process_env_has_defaults(monkeypatch) -> None:
    from petald.server.executor import worker_env

    for key in KEYS:
        monkeypatch.delenv(key, raising=False)
    assert {k: worker_env().get(k) for k in KEYS} == OPENMP_DEFAULTS
