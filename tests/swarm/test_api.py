"""`petald api` driven by the official `openai` client, unmodified, on the local swarm it starts
itself (no --initial-peers: a node and two servers, each half of the real SmolLM2-135M-Instruct).
One api process for the module, with an API key; the last test stops it with SIGTERM and checks
that it and its whole local swarm are gone.

- A greedy chat completion answers "What is the capital of France?" as the local transformers
  model does (tests/swarm/test_models.py checks that answer against a local run).
- A sampled, seeded stream arrives in several chunks whose concatenation is the non-streamed
  answer to the same request (same seed: same text).
- Two streams at once, with different questions, both complete with their own right answers
  (each in its own inference session: a shared KV cache would mix them).
- Bad requests get OpenAI-style errors (openai.BadRequestError naming the field), a wrong key
  openai.AuthenticationError, an unknown route NotFoundError."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from petald.testing import DaemonProcess, Processes, descendants, processes_naming, still_running

pytestmark = pytest.mark.slow

KEY = "test-key-123"
START_TIMEOUT = 400.0  # a local swarm of the demo model and the client on 2 busy cores
FRANCE = "What is the capital of France?"


@dataclass
class Api:
    daemon: DaemonProcess
    url: str
    model: str
    tmp: Path

    def client(self, key: str = KEY) -> openai.OpenAI:
        # max_retries=0: a failure shows as it is, never hidden behind the client's retries.
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp = tmp_path_factory.mktemp("api")
    # TMPDIR: the local swarm's keys and logs go under it, so a leftover process names it.
    env = {**os.environ, "TMPDIR": str(tmp), "PETALD_CACHE_DIR": str(tmp / "cache")}
    argv = [sys.executable, "-m", "petald.cli", "api", "--listen", "127.0.0.1:0"]
    argv += ["--api-key", KEY, "--max-new-tokens", "64", "--max-concurrent", "2"]
    argv += ["--log-level", "info"]
    with Processes() as procs:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**env, "PYTHONUNBUFFERED": "1"},
        )
        daemon = procs.adopt(proc)
        ready = daemon.wait_ready(START_TIMEOUT)
        try:
            yield Api(daemon, ready["url"], ready["model"], tmp)
        finally:
            daemon.stop()
            print(daemon.log())  # shown with a failure: the api's own account


def ask(api: Api, question: str, **kw: object) -> openai.types.chat.ChatCompletion:
    messages = [{"role": "user", "content": question}]
    return api.client().chat.completions.create(model=api.model, messages=messages, **kw)


def stream(api: Api, question: str, **kw: object) -> tuple[list[str], str | None]:
    """The content of each chunk, and the finish reason."""
    messages = [{"role": "user", "content": question}]
    chunks = api.client().chat.completions.create(
        model=api.model, messages=messages, stream=True, **kw
    )
    texts, finish = [], None
    for chunk in chunks:
        for choice in chunk.choices:
            if choice.delta.content:
                texts.append(choice.delta.content)
            finish = choice.finish_reason or finish
    return texts, finish


def test_greedy_chat_completion_answers_like_the_local_model(api: Api) -> None:
    """Catches: the chat template rendered without its generation prompt
    (add_generation_prompt=False: the answer is not the local model's); also meant for greedy
    decoding that samples and usage counts that are not the tokens."""
    assert [m.id for m in api.client().models.list()] == [api.model]
    out = ask(api, FRANCE, temperature=0, max_tokens=30)
    choice = out.choices[0]
    assert choice.message.content == "The capital of France is Paris."
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    assert out.usage is not None
    # 8 answer tokens ("The capital of France is Paris." and <|im_end|>) after the template's
    # 37 (its default system prompt, the question, the assistant header).
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (37, 8)
    assert out.usage.total_tokens == 45


def test_seeded_stream_arrives_in_chunks_that_make_the_whole_answer(api: Api) -> None:
    """Catches: a stream sent as one chunk at the end (the pieces joined before sending); also
    meant for chunks that lose or repeat text and a seed that does not repeat the sampling."""
    kw = {"temperature": 0.9, "top_p": 0.95, "seed": 7, "max_tokens": 16}
    question = "Name three colours."
    whole = ask(api, question, **kw).choices[0]
    texts, finish = stream(api, question, **kw)
    assert len(texts) >= 3, texts
    assert "".join(texts) == whole.message.content
    assert finish == whole.finish_reason


def test_two_concurrent_streams_complete_each_with_its_own_answer(api: Api) -> None:
    """Catches: concurrent forwards through the model without the engine's step lock (its
    forward is not reentrant: 500); also meant for requests sharing one inference session."""
    with ThreadPoolExecutor(2) as pool:
        france = pool.submit(stream, api, FRANCE, temperature=0, max_tokens=30)
        germany = pool.submit(stream, api, "What is the capital of Germany?", temperature=0,
                              max_tokens=30)  # fmt: skip
        (a, a_finish), (b, b_finish) = france.result(), germany.result()
    assert "".join(a) == "The capital of France is Paris." and a_finish == "stop"
    assert "Berlin" in "".join(b) and b_finish == "stop", b


@pytest.mark.parametrize(
    ("kw", "param", "words"),
    [
        ({"max_tokens": -1}, "max_tokens", "max_tokens must be between 1 and 64"),
        ({"max_tokens": 65}, "max_tokens", "max_tokens must be between 1 and 64"),
        ({"model": "gpt-4o"}, "model", "does not exist"),
        ({"temperature": 3}, "temperature", "temperature must be between 0 and 2"),
        ({"n": 2}, "n", "not supported"),
    ],
)
def test_bad_requests_get_openai_errors(api: Api, kw: dict, param: str, words: str) -> None:
    """Catches: the integer range check removed (max_tokens=-1 and 65 were answered with
    200): a bad field must be a 400 in OpenAI's shape that names it, streamed or not."""
    messages = [{"role": "user", "content": "hi"}]
    request = {"model": api.model, "messages": messages, **kw}
    for streamed in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            api.client().chat.completions.create(**request, stream=streamed)
        assert err.value.status_code == 400
        body = err.value.body
        assert isinstance(body, dict) and body["param"] == param, body
        assert body["type"] == "invalid_request_error" and words in body["message"], body


def test_the_api_key_is_enforced_and_unknown_routes_are_404(api: Api) -> None:
    """Catches: the key check skipped (a wrong key listed the models); also meant for errors
    that are not in OpenAI's shape."""
    with pytest.raises(openai.AuthenticationError) as err:
        api.client(key="wrong").models.list()
    assert err.value.body["code"] == "invalid_api_key"  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):
        ask_with = api.client(key=KEY + "x")
        ask_with.completions.create(model=api.model, prompt="a", max_tokens=1)
    r = httpx.post(f"{api.url}/v1/completions", json={"model": api.model, "prompt": "a"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(f"{api.url}/v2/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    out = api.client().completions.create(
        model=api.model, prompt="The capital of France is", max_tokens=2, temperature=0
    )
    assert out.choices[0].text == " Paris." and out.choices[0].finish_reason == "length"


def test_sigterm_stops_the_api_and_its_local_swarm(api: Api) -> None:
    """Last: stops the module's api. Catches: SIGTERM not handled by the api's trio loop (the
    local swarm's handler then raises SystemExit inside trio: a crash, not status 0); also
    meant for a SIGTERM that leaves the servers running."""
    below = descendants(api.daemon.proc.pid)
    assert len(below) >= 3  # the node and two servers (and their compute processes)
    try:
        assert api.daemon.stop(sig=signal.SIGTERM, timeout=60) == 0, api.daemon.log()
        assert still_running(below, 30) == []
    finally:
        for fd in below.values():
            os.close(fd)
    assert processes_naming(str(api.tmp)) == []
