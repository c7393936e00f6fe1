"""Servers passing activations on (`/petald/push/1.0.0`): in an inference step sent in
pass-on mode, each server of a route sends its output straight into the next server's session
instead of the client relaying it, so a token costs one network leg per hop plus one back to
the client (client-driven: two per hop).

    upstream server: {"session": token}                              once, opening the stream
    upstream server: {"step": id, "position": p} + [hidden]          per step, no answer

`token` is the capability a session's open reply gave its client (16 random bytes): only a
server the client told it to can push into a session, and the session takes a push only from
the peer its client named as upstream (checked by `InferenceSessions`). The downstream side is
`PushInbox.deliver`, the upstream side `PushLink`. A push that fails is reported to the client
(`"pushed": false`), which then sends that hidden state itself: nothing waits on it.

Entry points: `PushRegistry.register(host)`; `PushLink(open_stream, peer, token)`."""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol

from petald.errors import CodecError, FrameError, MessageError
from petald.server.memory import SESSION_IDLE_TIMEOUT
from petald.wire.frames import Frame
from petald.wire.messages import read_message, write_message
from petald.wire.protocols import PUSH_PROTOCOL

log = logging.getLogger(__name__)

TOKEN_BYTES = 16
# Opening the stream to the next server (a dial at worst) and writing one step into it: past
# these the client is told the push failed and sends the hidden state itself.
PUSH_OPEN_TIMEOUT = 5.0
PUSH_WRITE_TIMEOUT = 10.0
# Push streams into one session at a time (the upstream server, and one replacing it).
MAX_PUSH_STREAMS = 2


@dataclass(frozen=True, slots=True)
class Pushed:
    """One hidden state pushed into a session, as it arrived (checked like a client's later)."""

    peer: str
    step: int
    position: int
    hidden: Frame


class PushInbox:
    """Where pushes into one session land: the session's own message channel (it reads its
    client's messages from the same one, so it waits for whichever comes first)."""

    def __init__(self, send: trio.MemorySendChannel[Any]) -> None:
        self.send = send
        self.streams = 0


class PushRegistry:
    """The open sessions' inboxes by token; answers `/petald/push/1.0.0`."""

    def __init__(self) -> None:
        self._inboxes: dict[bytes, PushInbox] = {}

    def register(self, host: IHost) -> None:
        host.set_stream_handler(PUSH_PROTOCOL, self._on_push)

    def add(self, send: trio.MemorySendChannel[Any]) -> bytes:
        token = secrets.token_bytes(TOKEN_BYTES)
        self._inboxes[token] = PushInbox(send)
        return token

    def remove(self, token: bytes) -> None:
        self._inboxes.pop(token, None)

    async def _on_push(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id.to_base58()
        inbox = None
        try:
            with trio.fail_after(PUSH_OPEN_TIMEOUT):
                header, _ = await read_message(stream, max_tensor_bytes=0, frames=True)
            token = header.get("session")
            inbox = self._inboxes.get(token) if isinstance(token, bytes) else None
            if inbox is None or inbox.streams >= MAX_PUSH_STREAMS:
                return  # unknown or ended session: nothing to say to a stranger
            inbox.streams += 1
            while True:
                with trio.move_on_after(SESSION_IDLE_TIMEOUT) as idle:
                    header, frames = await read_message(stream, frames=True)
                if idle.cancelled_caught:
                    return
                step, position = header.get("step"), header.get("position")
                if type(step) is not int or type(position) is not int or len(frames) != 1:
                    return  # a server that speaks this protocol wrong is not listened to
                # Blocks while the session is busy (its channel is small): back-pressure.
                await inbox.send.send(Pushed(peer, step, position, frames[0]))
        except (MessageError, FrameError, CodecError, trio.TooSlowError) as e:
            log.debug("push from %s dropped: %s", peer, e)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the session ended
        except Exception as e:  # a peer's broken stream must not take the daemon down
            log.debug("push stream from %s ended: %s", peer, e)
        finally:
            if inbox is not None:
                inbox.streams -= 1
            with contextlib.suppress(Exception):
                await stream.reset()


StreamOpener = Callable[[str, TProtocol], Awaitable[Any]]


class PushLink:
    """The upstream end: one stream into one downstream session, opened on the first push."""

    def __init__(self, open_stream: StreamOpener, peer: str, token: bytes) -> None:
        self.open_stream = open_stream
        self.peer, self.token = peer, token
        self._stream: Any = None
        self.failed = False

    async def push(self, step: int, position: int, hidden: Frame) -> bool:
        """Sends one step's output; False (and no more tries on this link) if it failed."""
        if self.failed:
            return False
        try:
            if self._stream is None:
                with trio.fail_after(PUSH_OPEN_TIMEOUT):
                    self._stream = await self.open_stream(self.peer, PUSH_PROTOCOL)
                    await write_message(self._stream, {"session": self.token})
            with trio.fail_after(PUSH_WRITE_TIMEOUT):
                await write_message(self._stream, {"step": step, "position": position}, [hidden])
            return True
        except Exception as e:  # unreachable, gone, too slow: the client sends it instead
            log.info("pushing to %s failed (%s); the client relays instead", self.peer, e)
            self.failed = True
            await self.close()
            return False

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with trio.move_on_after(1.0) as scope, contextlib.suppress(Exception):
                scope.shield = True
                await stream.close()
