"""The client side of a swarm: `SwarmClient` (a client-mode peer on a background trio loop,
for synchronous code), `RemoteSequential` (remote blocks used like local layers: forward,
backward, sub-ranges) and its `InferenceSession`s with failover, `RoutePlanner` (which servers
a request goes through) and the async RPC calls underneath (`petald.client.rpc`). Training:
`remote_forward` (remote blocks in torch autograd) with a `Tuning` (deep prompts, client LoRA,
a server adapter's name) per request."""

from petald.client.autograd import remote_forward
from petald.client.routing import Hop, PeerBans, RoutePlanner, RoutingPolicy
from petald.client.runtime import ClientConfig, SwarmClient
from petald.client.sequence import ForwardTrace, RemoteSequential
from petald.client.session import Failover, InferenceSession, SessionStats
from petald.client.tuning import Tuning

__all__ = [
    "ClientConfig",
    "Failover",
    "ForwardTrace",
    "Hop",
    "InferenceSession",
    "PeerBans",
    "RemoteSequential",
    "RoutePlanner",
    "RoutingPolicy",
    "SessionStats",
    "SwarmClient",
    "Tuning",
    "remote_forward",
]
