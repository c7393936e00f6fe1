"""`petald api`'s request validation (petald.api.schema) and its text pieces (petald.api.text):
requests are untrusted input, so no body crashes the validator (it returns a request or raises
ApiError 400), every bad field is named in the error's `param`, valid requests parse into what
they say, and the streamed text is cut at stop sequences without ever showing one."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from petald.api.schema import (
    ApiError,
    Limits,
    Message,
    parse_chat,
    parse_completion,
    parse_json,
)
from petald.api.text import StopText

LIMITS = Limits(models=frozenset({"m"}), max_tokens=100, vocab_size=1000)
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
TEXT = {"model": "m", "prompt": "Once"}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = [
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature",
    "top_p", "stop", "seed", "stream", "stream_options", "n", "presence_penalty", "logprobs",
    "tools", "echo", "user",
]  # fmt: skip


def parse(kind: str, body: dict[str, Any]) -> Any:
    return (parse_chat if kind == "chat" else parse_completion)(body, LIMITS)


@settings(max_examples=100, deadline=None)
@given(
    kind=st.sampled_from(["chat", "text"]),
    extra=st.dictionaries(
        st.sampled_from(["stream", "stream_options", "max_tokens", "max_completion_tokens"]),
        json_values | st.sampled_from([True, 5, {"include_usage": True}]),
        min_size=2,
    ),
)
def test_no_body_crashes_the_validator(kind: str, extra: dict[str, Any]) -> None:
    """Several interacting fields at once, any values. Catches: a check that assumes another
    field's shape (stream_options taken for a dict: a list with stream true raised
    AttributeError instead of a 400)."""
    body = {**(CHAT if kind == "chat" else TEXT), **extra}
    try:
        parse(kind, body)
    except ApiError as e:
        assert e.status == 400 and e.message
        assert e.body()["error"]["type"] == "invalid_request_error"
        json.dumps(e.body())  # always serialisable


BAD_FIELDS = [
    ("model", "gpt-4"),
    ("model", 3),
    ("max_tokens", -1),
    ("max_tokens", 0),
    ("max_tokens", 101),  # over the server's --max-new-tokens
    ("max_tokens", 2.5),
    ("max_tokens", True),  # a bool is not an integer here
    ("temperature", 2.5),
    ("temperature", -0.1),
    ("temperature", "hot"),
    ("top_p", 1.5),
    ("seed", 2**64),
    ("seed", "1"),
    ("stop", 5),
    ("stop", ["a", "b", "c", "d", "e"]),
    ("stop", [""]),
    ("stop", "x" * 300),
    ("stream", "yes"),
    ("stream_options", {"include_usage": True}),  # without stream
    ("n", 2),
    ("presence_penalty", 0.5),
    ("logprobs", True),
    ("unknown_field", 1),
]


@pytest.mark.parametrize("kind", ["chat", "text"])
@pytest.mark.parametrize(("field", "value"), BAD_FIELDS)
def test_every_bad_field_is_a_400_naming_it(kind: str, field: str, value: object) -> None:
    """Catches: a range check left out (the integer one removed: max_tokens=-1 was accepted),
    or an error that does not say which field is wrong."""
    body = {**(CHAT if kind == "chat" else TEXT), field: value}
    with pytest.raises(ApiError) as err:
        parse(kind, body)
    assert err.value.status == 400
    assert err.value.param == field, err.value.message


@settings(max_examples=150, deadline=None)
@given(kind=st.sampled_from(["chat", "text"]), field=st.sampled_from(FIELDS), value=json_values)
def test_any_value_of_a_field_parses_or_is_a_400_naming_that_field(
    kind: str, field: str, value: object
) -> None:
    """Catches: a field read without a type check (`stop`'s removed: stop=5 raised
    TypeError instead of a 400), or an error that names another field (seed's named
    max_tokens)."""
    try:
        parse(kind, {**(CHAT if kind == "chat" else TEXT), field: value})
    except ApiError as e:
        assert e.status == 400
        assert e.param is not None and e.param.split("[")[0].split(".")[0] == field, e.message


BAD_MESSAGES = [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "a", "x": 1}]}, "messages[0].x"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "messages[0].content[0]",
    ),
    ({"messages": [{"role": "user", "content": "a" * 400_001}]}, "messages"),
    ({"messages": None}, "messages"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_MESSAGES)
def test_bad_messages_name_the_message(fields: dict[str, Any], param: str) -> None:
    """Catches: messages accepted without checking each one (the role check removed: a
    "tool" message reached the chat template)."""
    with pytest.raises(ApiError) as err:
        parse_chat({**CHAT, **fields}, LIMITS)
    assert (err.value.status, err.value.param) == (400, param)


@pytest.mark.parametrize(
    "prompt", [None, 5, [], ["a", "b"], [1, "a"], [1000], [-1], "x" * 400_001, [True]]
)
def test_bad_prompts_are_refused(prompt: object) -> None:
    """Catches: token ids not checked against the vocabulary (they would index past the
    embeddings), a batch of prompts, or an unbounded prompt reaching the tokenizer."""
    with pytest.raises(ApiError) as err:
        parse_completion({**TEXT, "prompt": prompt}, LIMITS)
    assert (err.value.status, err.value.param) == (400, "prompt")


def test_valid_requests_parse_into_what_they_say() -> None:
    """Catches: defaults other than OpenAI's (temperature 0.7 instead of 1), or a field
    dropped on the way."""
    chat = parse_chat(
        {
            **CHAT,
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
            ],
            "max_completion_tokens": 7,
            "temperature": 0,
            "stop": "\n",
            "seed": -3,
            "stream": True,
            "stream_options": {"include_usage": True},
            "n": 1,
            "user": "me",
        },
        LIMITS,
    )
    assert chat.messages == (Message("system", "Be brief."), Message("user", "ab"))
    d = chat.decoding
    assert (d.max_tokens, d.fit, d.stop, d.stream, d.include_usage) == (
        7,
        False,
        ("\n",),
        True,
        True,
    )
    assert (d.sampling.temperature, d.sampling.top_p, d.sampling.seed) == (0.0, 1.0, -3)
    default = parse_chat(CHAT, LIMITS).decoding
    assert (default.max_tokens, default.fit, default.sampling.temperature) == (100, True, 1.0)
    text = parse_completion({**TEXT, "prompt": [[1, 2, 3]], "stop": ["a", "b"]}, LIMITS)
    assert text.prompt == (1, 2, 3) and text.decoding.stop == ("a", "b")
    assert parse_completion(TEXT, LIMITS).decoding.max_tokens == 16  # OpenAI's default


@pytest.mark.parametrize(
    "raw", [b"", b"{", b"[1]", b'"x"', b"\xff\xfe", b'{"a": NaN}', b"[" * 100_000 + b"]" * 100_000]
)
def test_bodies_that_are_not_a_json_object_are_400(raw: bytes) -> None:
    """Catches: RecursionError on deeply nested arrays (or NaN slipping through as a float)
    escaping as a 500."""
    with pytest.raises(ApiError) as err:
        parse_json(raw)
    assert err.value.status == 400 and err.value.code == "invalid_json"


@settings(max_examples=200, deadline=None)
@given(
    pieces=st.lists(st.text("ab\n", max_size=4), max_size=12),
    stops=st.lists(st.text("ab\n", min_size=1, max_size=3), max_size=3),
)
def test_stop_text_is_the_text_before_the_first_stop_and_never_shows_one(
    pieces: list[str], stops: list[str]
) -> None:
    """Catches: no text held back (a stop sequence split over two pieces was streamed before
    it was recognised), or held-back text lost or repeated at the end."""
    cut = StopText(tuple(stops))
    out = ""
    for piece in pieces:
        out += cut.feed(piece)
        assert not any(s in out for s in stops)
    out += cut.finish()
    whole = "".join(pieces)
    # The oracle, a character at a time: the text ends at the first stop to be complete.
    ends = [(p, p - len(s)) for p in range(len(whole) + 1) for s in stops if whole[:p].endswith(s)]
    assert out == (whole[: min(ends)[1]] if ends else whole)
    assert cut.stopped == bool(ends)
