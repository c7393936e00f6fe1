"""petald's HTTP side: a small ASGI stack that runs inside a daemon's or client's own trio loop
(Starlette apps served by hypercorn's trio worker, `petald.web.http`), the swarm health page and
its JSON endpoint (`petald.web.health`, shown by `petald status --web`) and the client's own
latency probes of the servers it lists (`petald.web.latency`)."""
