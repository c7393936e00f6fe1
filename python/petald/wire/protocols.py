"""The libp2p protocol ids of the block RPCs, shared by servers and clients (neither imports the
other). Messages on them are petald.wire.messages; the contracts are documented where they are
served: petald.server.handlers (info, forward, backward) and petald.server.inference."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from libp2p.custom_types import TProtocol
else:
    # py-libp2p's TProtocol is NewType(str): a plain str at run time. Not imported from it, so
    # that `petald serve` can parse its flags and spawn its compute process before py-libp2p's
    # seconds-long import (petald.cli.serve imports this through petald.server.allow).
    TProtocol = str

INFO_PROTOCOL = TProtocol("/petald/info/1.0.0")
FORWARD_PROTOCOL = TProtocol("/petald/forward/1.0.0")
BACKWARD_PROTOCOL = TProtocol("/petald/backward/1.0.0")
INFERENCE_PROTOCOL = TProtocol("/petald/inference/1.0.0")
PUSH_PROTOCOL = TProtocol("/petald/push/1.0.0")
