"""`petald chat` imports torch, transformers, accelerate, tokenizers and gguf in its main thread,
before the threads that load the tokenizer and the model start (issue 16: two threads importing
transformers' lazy modules at once got half-imported modules, `KeyError: 'accelerate'` and
`cannot import name 'AcceleratorState' from partially initialized module 'accelerate.state'`).

Not a reproduction of the race, which depends on timing, but a check of its cause: the chat runs
on a cold tokenizer cache (the GGUF tokenizer is converted, as on the first start) with an
import hook first on sys.meta_path that finds nothing and only notes which thread asked for each
module of those packages; none may be imported first by another thread. Which thread imports a
module first does not depend on how fast the import is, so the bytecode cache stays warm (a cold
one, every module of torch compiled, made this test 111 s instead of ~30).
The swarm is a bootstrap node and an announcer claiming every block of the demo model, so the
client loads its share of the model and its tokenizer without any server loading blocks; the
user types /exit at the first prompt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from petald.testing import start_announcer, start_daemon, stop_all

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct.Q4_1"
HEAVY = ("torch", "transformers", "accelerate", "tokenizers", "peft", "gguf", "safetensors")
HEAVY += ("huggingface_hub",)

# `python -c RECORDER LOG petald-args...`: runs `petald petald-args...` with the hook installed,
# then writes [module, imported by the main thread] pairs, in import order, to LOG.
RECORDER = f"""\
import json, sys, threading

HEAVY = {HEAVY!r}
first = []


class Recorder:
    # Finders are asked only for modules not in sys.modules yet: the first import of each.
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HEAVY:
            first.append((name, threading.current_thread() is threading.main_thread()))
        return None  # the real finders, after this one, find it


sys.meta_path.insert(0, Recorder())
from petald.cli import main

try:
    code = main(sys.argv[2:])
finally:
    with open(sys.argv[1], "w") as f:
        json.dump(first, f)
sys.exit(code)
"""


def test_chat_imports_the_heavy_modules_in_its_main_thread(tmp_path: Path) -> None:
    node = start_daemon("node", "--new-swarm", identity=tmp_path / "node.key")
    daemons = [node]
    log = tmp_path / "imports.json"
    try:
        # Announced for 10 minutes: no heartbeat needs to reach the slow, cold client.
        claim = ["--n-blocks", "30", "--initial-peers", node.addr, "--ttl", "600"]
        daemons.append(start_announcer(MODEL, "0:30", *claim))
        env = {
            **os.environ,
            "PETALD_CACHE_DIR": str(tmp_path / "cache"),  # empty: the tokenizer is converted
            "PYTHONUNBUFFERED": "1",
        }
        chat = ["chat", "--initial-peers", node.addr, "--greedy"]
        r = subprocess.run(
            [sys.executable, "-c", RECORDER, str(log), *chat],
            input="/exit\n",
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
    finally:
        stop_all(daemons)
    # At the prompt: the tokenizer and the model were loaded, each on its thread.
    assert r.returncode == 0 and "petald chat:" in r.stdout, r.stdout + r.stderr
    first = json.loads(log.read_text())
    names = {name for name, _ in first}
    # The hook saw what the two threads use: the lazy modules of the tracebacks, the
    # family's modeling code and the GGUF tokenizer conversion.
    used = {"accelerate.hooks", "accelerate.state", "transformers.generation.utils"}
    used |= {"transformers.models.llama.modeling_llama", "transformers.integrations.ggml"}
    assert used <= names, sorted(used - names)
    off_main = [name for name, in_main in first if not in_main]
    assert off_main == [], f"first imported outside the main thread: {off_main}"
