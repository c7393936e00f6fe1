"""`petald api`: an OpenAI-compatible HTTP API over a model whose blocks run on a swarm.
`schema` validates requests, `generation` runs answers through the distributed model (one
inference session each), `text` turns tokens into streamed text, `sse` streams it, `app` is the
Starlette app that `petald.cli.api` serves with hypercorn's trio worker."""

from petald.api.app import AppConfig, build_app
from petald.api.generation import Engine, EngineConfig
from petald.api.schema import ApiError

__all__ = ["ApiError", "AppConfig", "Engine", "EngineConfig", "build_app"]
