"""Validation of `petald api`'s requests: HTTP bodies are untrusted input, so each one is parsed
once, here, into a frozen dataclass (`ChatRequest`, `CompletionRequest`) or rejected with an
`ApiError` in OpenAI's error shape that names the offending field (`param`). Every field's type,
range and size is checked; fields OpenAI defines that petald does not implement are accepted only
at their neutral value (`presence_penalty: 0`, `n: 1`, ...), unknown fields are refused as
OpenAI refuses them. Entry points: `parse_json(raw)`, then `parse_chat(body, limits)` or
`parse_completion(body, limits)`. Pure functions, no I/O: tests/unit/api/test_schema.py."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

MAX_BODY_BYTES = 1 << 20  # a request body; a 1 MiB prompt is far beyond any context we serve
MAX_MESSAGES = 512  # messages in one chat request
MAX_PROMPT_CHARS = 400_000  # characters of text before tokenizing: bounds the tokenizer's work
MAX_PROMPT_TOKENS = 131_072  # token ids given directly as a completion prompt
MAX_STOP = 4  # stop sequences, as OpenAI allows
MAX_STOP_CHARS = 256  # characters of one stop sequence
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# torch.Generator.manual_seed takes [-2**63, 2**64): any seed a client sends must fit.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
COMMON = frozenset({"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream"})
# Accepted only at the neutral value given: anything else changes the answer in a way we cannot.
NEUTRAL: dict[str, tuple[object, ...]] = {
    "n": (1,),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logprobs": (False, 0),
    "logit_bias": ({},),
    "best_of": (1,),
    "echo": (False,),
    "suffix": ("",),
    "tools": ([],),
    "tool_choice": ("none",),
    "response_format": ({"type": "text"},),
}
SHARED = frozenset({"n", "presence_penalty", "frequency_penalty", "logprobs", "logit_bias", "user"})
CHAT_FIELDS = COMMON | SHARED | {
    "messages", "max_completion_tokens", "stream_options", "top_logprobs", "tools", "tool_choice",
    "response_format", "parallel_tool_calls", "store", "metadata", "service_tier",
}  # fmt: skip
COMPLETION_FIELDS = COMMON | SHARED | {"prompt", "stream_options", "best_of", "echo", "suffix"}


class ApiError(Exception):
    """An OpenAI-shaped error: `{"error": {"message", "type", "param", "code"}}` + HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code
        )  # fmt: skip

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Limits:
    """What this server accepts: its model names, the largest max_tokens (--max-new-tokens)."""

    models: frozenset[str]
    max_tokens: int
    vocab_size: int = 1 << 20  # token ids in a completion prompt must be below it


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # OpenAI's defaults; 0 is greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class Decoding:
    """What both endpoints share once validated."""

    model: str
    max_tokens: int
    fit: bool  # max_tokens was not given: lower it to what fits in the context, do not refuse
    sampling: Sampling
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class Message:
    role: str  # system, user or assistant (OpenAI's "developer" is a system message)
    content: str


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[Message, ...]
    decoding: Decoding


@dataclass(frozen=True)
class CompletionRequest:
    prompt: str | tuple[int, ...]  # text, or token ids
    decoding: Decoding


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; NaN/Infinity and nesting deep enough to exhaust the parser's
    recursion are refused like any malformed JSON."""

    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    try:
        body = json.loads(raw, parse_constant=no_constants)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError too
        raise ApiError(
            400, f"the request body is not valid JSON: {e}", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def parse_chat(body: dict[str, Any], limits: Limits) -> ChatRequest:
    _known(body, CHAT_FIELDS)
    messages = body.get("messages")
    if messages is None:
        raise bad("messages", "messages is required", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "messages must be a non-empty array", "invalid_type")
    if len(messages) > MAX_MESSAGES:
        raise bad("messages", f"at most {MAX_MESSAGES} messages")
    parsed = tuple(_message(m, f"messages[{i}]") for i, m in enumerate(messages))
    if sum(len(m.content) for m in parsed) > MAX_PROMPT_CHARS:
        raise bad("messages", f"the messages exceed {MAX_PROMPT_CHARS} characters")
    if body.get("top_logprobs") is not None:
        raise bad("top_logprobs", "top_logprobs is not supported", "unsupported_value")
    given = {k: body[k] for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None}
    if len(given) == 2 and given["max_tokens"] != given["max_completion_tokens"]:
        raise bad("max_tokens", "max_tokens and max_completion_tokens differ: give one")
    name, value = next(iter(given.items()), ("max_tokens", None))
    return ChatRequest(parsed, _decoding(body, limits, name, value, limits.max_tokens))


def parse_completion(body: dict[str, Any], limits: Limits) -> CompletionRequest:
    _known(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("prompt", "prompt is required", "missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if len(prompt) > MAX_PROMPT_CHARS:
            raise bad("prompt", f"the prompt exceeds {MAX_PROMPT_CHARS} characters")
        value: str | tuple[int, ...] = prompt
    elif isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        if len(prompt) > MAX_PROMPT_TOKENS:
            raise bad("prompt", f"the prompt exceeds {MAX_PROMPT_TOKENS} tokens")
        if not all(0 <= t < limits.vocab_size for t in prompt):
            raise bad("prompt", f"token ids must be in [0, {limits.vocab_size})")
        value = tuple(prompt)
    else:
        raise bad(
            "prompt",
            "prompt must be a string or an array of token ids (one prompt per request)",
            "invalid_type",
        )
    default = min(COMPLETION_DEFAULT_MAX_TOKENS, limits.max_tokens)
    return CompletionRequest(
        value, _decoding(body, limits, "max_tokens", body.get("max_tokens"), default)
    )


def _known(body: dict[str, Any], allowed: frozenset[str]) -> None:
    for key, value in body.items():
        if key not in allowed:
            raise bad(key, f"Unrecognized request argument supplied: {key}", "unknown_parameter")
        neutral = NEUTRAL.get(key)
        if neutral is not None and value is not None and not _is_neutral(value, neutral):
            shown = json.dumps(value)[:80]
            raise bad(
                key,
                f"{key}={shown} is not supported by petald (only {json.dumps(neutral[0])})",
                "unsupported_value",
            )


def _is_neutral(value: object, neutral: tuple[object, ...]) -> bool:
    # `type(...) is` so that true is not 1 and 1 is not true; dicts and lists by equality.
    return any(type(value) is type(n) and value == n for n in neutral)


def _message(m: object, where: str) -> Message:
    if not isinstance(m, dict):
        raise bad(where, f"{where} must be an object", "invalid_type")
    for key in m:
        if key not in ("role", "content", "name"):
            raise bad(f"{where}.{key}", f"{where}.{key} is not supported", "unknown_parameter")
    role = m.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise bad(f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)}")
    if m.get("name") is not None and not isinstance(m["name"], str):
        raise bad(f"{where}.name", f"{where}.name must be a string", "invalid_type")
    content = m.get("content")
    if isinstance(content, list):  # content parts: only text ones
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise bad(f"{where}.content[{j}]", "only text content parts are supported")
            if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                raise bad(f"{where}.content[{j}]", "a text part is {type: text, text: string}")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise bad(f"{where}.content", f"{where}.content must be a string", "invalid_type")
    return Message(ROLES[role], content)


def _decoding(
    body: dict[str, Any], limits: Limits, max_name: str, max_value: object, default: int
) -> Decoding:
    model = body.get("model")
    if model is None:
        raise bad("model", "model is required", "missing_required_parameter")
    if not isinstance(model, str) or model not in limits.models:
        shown = json.dumps(model)[:80]
        names = ", ".join(sorted(limits.models))
        raise bad(
            "model", f"The model {shown} does not exist; this server has {names}", "model_not_found"
        )
    if max_value is None:
        max_tokens, fit = default, True
    else:
        max_tokens, fit = _int(max_name, max_value, 1, limits.max_tokens), False
    temperature = _number("temperature", body.get("temperature"), 0.0, 2.0, 1.0)
    top_p = _number("top_p", body.get("top_p"), 0.0, 1.0, 1.0)
    seed = body.get("seed")
    seed = None if seed is None else _int("seed", seed, SEED_MIN, SEED_MAX)
    stream = body.get("stream")
    if stream is not None and type(stream) is not bool:
        raise bad("stream", "stream must be a boolean", "invalid_type")
    include_usage = _stream_options(body.get("stream_options"), bool(stream))
    return Decoding(
        model=model,
        max_tokens=max_tokens,
        fit=fit,
        sampling=Sampling(temperature, top_p, seed),
        stop=_stop(body.get("stop")),
        stream=bool(stream),
        include_usage=include_usage,
    )


def _int(param: str, value: object, low: int, high: int) -> int:
    if type(value) is not int:
        raise bad(param, f"{param} must be an integer", "invalid_type")
    if not low <= value <= high:
        raise bad(param, f"{param} must be between {low} and {high}, got {value}")
    return value


def _number(param: str, value: object, low: float, high: float, default: float) -> float:
    if value is None:
        return default
    if type(value) not in (int, float) or not math.isfinite(value):  # type: ignore[arg-type]
        raise bad(param, f"{param} must be a number", "invalid_type")
    if not low <= value <= high:  # type: ignore[operator]
        raise bad(param, f"{param} must be between {low:g} and {high:g}, got {value}")
    return float(value)  # type: ignore[arg-type]


def _stop(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", "stop must be a string or an array of strings", "invalid_type")
    if len(stops) > MAX_STOP:
        raise bad("stop", f"at most {MAX_STOP} stop sequences")
    if not all(0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise bad("stop", f"stop sequences must have 1 to {MAX_STOP_CHARS} characters")
    return tuple(dict.fromkeys(stops))


def _stream_options(value: object, stream: bool) -> bool:
    if value is None:
        return False
    if not stream:
        raise bad("stream_options", "stream_options is only allowed with stream: true")
    if not isinstance(value, dict) or set(value) - {"include_usage"}:
        raise bad("stream_options", "stream_options is {include_usage: boolean}", "invalid_type")
    usage = value.get("include_usage", False)
    if type(usage) is not bool:
        raise bad("stream_options", "include_usage must be a boolean", "invalid_type")
    return usage
