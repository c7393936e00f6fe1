"""The pure parts of `petald chat`/`petald demo`: how a local swarm splits a model's blocks,
sampling flags checked before anything starts, and the CLI staying fast to import."""

import itertools
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from petald.cli.conversation import Sampling
from petald.cli.local_swarm import DemoModelMissing, demo_model, split_blocks


@given(st.integers(1, 200).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))))
def test_split_blocks_covers_the_model_in_near_equal_spans(case: tuple[int, int]) -> None:
    n_blocks, n_servers = case
    spans = split_blocks(n_blocks, n_servers)
    assert len(spans) == n_servers
    assert spans[0].start == 0 and spans[-1].end == n_blocks
    assert all(a.end == b.start for a, b in itertools.pairwise(spans))
    sizes = [s.end - s.start for s in spans]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_split_blocks_halves_the_demo_model() -> None:
    assert [str(s) for s in split_blocks(30, 2)] == ["0:15", "15:30"]


@pytest.mark.parametrize("n_servers", [0, 31])
def test_split_blocks_refuses_impossible_counts(n_servers: int) -> None:
    with pytest.raises(ValueError, match="--servers"):
        split_blocks(30, n_servers)


def test_sampling_flags() -> None:
    assert Sampling(greedy=True).generate_kwargs() == {"do_sample": False, "max_new_tokens": 256}
    assert Sampling(temperature=0).generate_kwargs()["do_sample"] is False
    sampled = Sampling(temperature=0.7, top_p=0.8, top_k=5, max_new_tokens=9).generate_kwargs()
    assert sampled == {
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 5,
        "max_new_tokens": 9,
    }
    drafted = Sampling(greedy=True, prompt_lookup=8).generate_kwargs()
    assert drafted["prompt_lookup_num_tokens"] == 8
    bad_flags = [{"temperature": -1}, {"top_p": 0}, {"top_k": -1}, {"max_new_tokens": 0}]
    for bad in [*bad_flags, {"prompt_lookup": -1}, {"prompt_lookup": 65}]:
        with pytest.raises(ValueError):
            Sampling(**bad)


def test_bad_chat_flags_fail_before_anything_starts() -> None:
    """A bad flag is a one-line error with status 2 before any swarm starts or torch loads."""
    r = subprocess.run(
        [sys.executable, "-m", "petald.cli", "chat", "--top-p", "2", "--initial-peers", "x"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "petald: --top-p must be in (0, 1]"


def test_a_missing_demo_model_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="just setup") as e:  # the CLI prints ValueErrors
        demo_model()
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, DemoModelMissing)
