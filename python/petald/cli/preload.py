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
import pkgutil
from pathlib import Path

# Imported inside transformers' functions (or through its lazy modules) on the way to a loaded
# model and tokenizer; importing `petald.models` brings torch, transformers' modeling code and
# accelerate already, these are the rest.
LAZY_MODULES = (
    "transformers.generation.utils",  # GenerationMixin.generate
    "transformers.generation.streamers",  # TextStreamer
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "transformers.tokenization_utils_tokenizers",  # TokenizersBackend, PreTrainedTokenizerFast
    "transformers.convert_slow_tokenizer",
    "transformers.modeling_gguf_pytorch_utils",  # a GGUF file's config, tensors, tokenizer
    "transformers.integrations.ggml",
    "accelerate.hooks",
    "accelerate.state",
    "safetensors.torch",
    "gguf",
)
# Packages whose every module is imported: transformers' GGUF support is a lazy package whose
# modules the config, tensor and tokenizer readers each reach for separately.
WHOLE_PACKAGES = ("transformers.integrations.gguf",)


def preload(source: str) -> None:
    """Imports everything loading `source` (a model directory, .gguf file or Hub id) and its
    tokenizer may import: the modules and packages above, the causal-LM and tokenizer classes
    of every family petald runs (any may be `source`'s; ~1 s in all), and the tokenizer class
    a local directory declares in its tokenizer_config.json."""
    import transformers
    from transformers.models.auto import modeling_auto, tokenization_auto

    import petald.models  # noqa: F401 - torch, transformers' modeling code, accelerate, the client
    from petald.models.families import LAYOUTS

    for name in LAZY_MODULES:
        importlib.import_module(name)
    for name in WHOLE_PACKAGES:
        package = importlib.import_module(name)
        for module in pkgutil.iter_modules(package.__path__, prefix=f"{name}."):
            importlib.import_module(module.name)
    for model_type in LAYOUTS:
        getattr(transformers, modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
        if tokenizer := tokenization_auto.TOKENIZER_MAPPING_NAMES.get(model_type):
            tokenization_auto.tokenizer_class_from_name(tokenizer)
    if declared := _declared_tokenizer(source):
        tokenization_auto.tokenizer_class_from_name(declared)


def _declared_tokenizer(source: str) -> str | None:
    path = Path(source).expanduser() / "tokenizer_config.json"
    try:
        declared = json.loads(path.read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):  # no such file (a GGUF file, a Hub id) or junk
        return None
    return declared if isinstance(declared, str) else None
