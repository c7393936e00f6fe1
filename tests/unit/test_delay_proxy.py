"""petald.testing.delay_proxy (the router of petald.testing.wan) as a real process on loopback.

Catches: a connection reset by one side ending the whole proxy (its exception group escaping
serve_tcp), after which every later connection through the router is refused, which made a
namespace test's next peer "unreachable" for a reason that was the proxy's own."""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys

TIMEOUT = 10.0  # seconds for any one socket operation


def test_a_reset_connection_leaves_the_proxy_serving() -> None:
    with socket.create_server(("127.0.0.1", 0)) as target:
        port = target.getsockname()[1]
        with socket.create_server(("127.0.0.1", 0)) as probe:  # a free port for the proxy
            listen = probe.getsockname()[1]
        proxy = subprocess.Popen(
            [sys.executable, "-m", "petald.testing.delay_proxy", "--delay", "0",
             f"127.0.0.1:{listen}=127.0.0.1:{port}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        try:
            assert proxy.stdout is not None and proxy.stdout.readline().strip() == "ready"
            target.settimeout(TIMEOUT)
            first = socket.create_connection(("127.0.0.1", listen), timeout=TIMEOUT)
            first.sendall(b"x")
            upstream, _ = target.accept()
            assert upstream.recv(1) == b"x"
            # Close with SO_LINGER 0: a reset, not a FIN, on the proxy's upstream socket.
            upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            upstream.close()
            first.settimeout(TIMEOUT)
            with contextlib.suppress(ConnectionResetError):
                assert first.recv(1) == b""  # the proxy closed our side once it saw the reset
            first.close()
            second = socket.create_connection(("127.0.0.1", listen), timeout=TIMEOUT)
            second.sendall(b"y")
            upstream, _ = target.accept()
            assert upstream.recv(1) == b"y"
            upstream.sendall(b"z")
            assert second.recv(1) == b"z"
            second.close()
            upstream.close()
            assert proxy.poll() is None
        finally:
            proxy.kill()
            proxy.wait(TIMEOUT)
