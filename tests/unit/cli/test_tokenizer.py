"""The GGUF tokenizer cache of `petald chat`: the tokenizer loaded from the cache encodes,
decodes and applies the chat template exactly as the one transformers converts from the file,
and a damaged entry is converted again rather than trusted."""

import json
from pathlib import Path

import pytest

from petald.cache import gguf_entry
from petald.cli.local_swarm import demo_model
from petald.cli.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow  # one GGUF conversion: ~15 s on 2 cores

TEXTS = ["What is the capital of France?", "naïve café — 東京 🐉\n\tcode: x = {'a': 1}", ""]


def test_cached_tokenizer_matches_the_gguf_conversion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PETALD_CACHE_DIR", str(tmp_path))
    gguf = str(demo_model())
    converted = load_tokenizer(gguf)
    entry = gguf_entry("tokenizers", Path(gguf))
    assert (entry / "tokenizer_config.json").is_file()
    cached = load_tokenizer(gguf)
    chat = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And of Germany?"},
    ]
    a, b = converted, cached
    prompt = a.apply_chat_template(chat, add_generation_prompt=True)
    assert b.apply_chat_template(chat, add_generation_prompt=True) == prompt
    for text in TEXTS:
        ids = a.encode(text)
        assert b.encode(text) == ids
        assert b.decode(ids, skip_special_tokens=True) == a.decode(ids, skip_special_tokens=True)
    assert (a.eos_token, a.bos_token, a.pad_token) == (b.eos_token, b.bos_token, b.pad_token)

    # A damaged entry is not trusted: the tokenizer is converted again.
    (entry / "tokenizer.json").write_text("{not json")
    again = load_tokenizer(gguf)
    assert again.encode(TEXTS[0]) == converted.encode(TEXTS[0])
    assert load_tokenizer(gguf).encode(TEXTS[0]) == converted.encode(TEXTS[0])  # replaced
    json.loads((entry / "tokenizer.json").read_text())  # the damaged entry was replaced
