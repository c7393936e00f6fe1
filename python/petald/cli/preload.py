"""The torch, transformers, accelerate, tokenizers and gguf modules that `petald chat` and
`petald demo` use, imported in the main thread before any thread that loads something starts:
`preload(source)`, which `petald.cli.conversation.open_conversation` calls first.

Why (issue 16): the tokenizer and the client's share of the model load at the same time, each
on its own thread, and both reach modules that transformers imports lazily (attributes of its
lazy modules, imports inside its functions): accelerate, the generation code, the GGUF and
tokenizer conversions. Python's per-module import locks do not make two threads importing one
module graph safe: where their imports meet in a cycle (accelerate.state <-> accelerate.utils),
the deadlock detection (`_lock_unlock_module` in importlib._bootstrap) lets one thread go on with
the other's partially initialized module — `ImportError: cannot import name 'AcceleratorState'
from partially initialized module 'accelerate.state'` — and once that import fails and leaves
sys.modules, the other thread's `import accelerate.hooks` finds its parent gone
(`parent_module = sys.modules[parent]` in `_find_and_load_unlocked`): `KeyError: 'accelerate'`.
The window is widest on a cold venv, where each first import compiles its bytecode. After
`preload`, the threads find every such module in sys.modules; tests/swarm/test_chat_imports.py
checks that on a cold bytecode cache."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

# Imported lazily on the way to a loaded model and tokenizer besides transformers' own (those are
# petald.hf_internals.import_lazy_modules); importing `petald.models` brings torch, transformers'
# modeling code and accelerate already.
LAZY_MODULES = ("accelerate.hooks", "accelerate.state", "safetensors.torch", "gguf")
# Families whose classes are imported even when `source` does not say its own (a GGUF file or a
# Hub id): the common ones, ~1 s in all.
COMMON_MODEL_TYPES = (
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma", "bloom", "falcon",
)  # fmt: skip


def preload(source: str) -> None:
    """Imports everything loading `source` (a model directory, .gguf file or Hub id) and its
    tokenizer may import: the modules above, transformers' lazily imported modules, the
    causal-LM and tokenizer classes of the common families and of the one a local directory's
    config.json declares, and the tokenizer class its tokenizer_config.json declares."""
    import petald.models  # noqa: F401 - torch, transformers' modeling code, accelerate, the client
    from petald.hf_internals import causal_lm_model_types, import_lazy_modules

    for name in LAZY_MODULES:
        importlib.import_module(name)
    types = list(COMMON_MODEL_TYPES)
    declared = _declared(source, "config.json", "model_type")
    if declared in causal_lm_model_types() and declared not in types:
        types.append(declared)
    import_lazy_modules(types, _declared(source, "tokenizer_config.json", "tokenizer_class"))


def _declared(source: str, file: str, key: str) -> str | None:
    path = Path(source).expanduser() / file
    try:
        declared = json.loads(path.read_text()).get(key)
    except (OSError, ValueError, AttributeError):  # no such file (a GGUF file, a Hub id) or junk
        return None
    return declared if isinstance(declared, str) else None
