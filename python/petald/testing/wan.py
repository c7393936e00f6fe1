"""`Wan`: peers in network namespaces that reach each other only through a delaying router, so
round trips that matter on the internet can be measured on one machine (needs root).

    member i ns:  m<i>  10.213.<i>.2/24  listens on :4001
                   |  veth
    router ns:    r<i>  10.213.<i>.1/24  delay proxy :4001 -> 10.213.<i>.2:4001

The router does not forward packets: a member reaches another only at the other's router
address (`public(i)`), through the delay proxy (petald.testing.delay_proxy), which delays each
direction by `delay` seconds. A connection passes one proxy, so every one-way leg between two
peers costs `delay` once. Members announce their router address (`--announce`); other members'
own addresses are unreachable at once (a `prohibit` route), never a silent timeout. `rate`
(e.g. "100mbit") limits each member's uplink with a token bucket filter. Port 4001 is fixed
because each namespace has a port space of its own, used by nothing else."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Sequence

PORT = 4001
NET = "10.213"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


class Wan:
    def __init__(self, members: int, delay: float, rate: str | None = None) -> None:
        if not 1 <= members <= 200:
            raise ValueError("members must be 1..200")
        sfx = f"{os.getpid() % 10000}{secrets.token_hex(2)}"  # veth names fit in 15 characters
        self.members, self.delay, self.rate = members, delay, rate
        self.router = f"petald-r{sfx}"
        self.ns = [f"petald-m{i}-{sfx}" for i in range(members)]
        self._veth = [(f"m{i}x{sfx}", f"r{i}x{sfx}") for i in range(members)]
        self._created: list[str] = []
        self.proxy: subprocess.Popen[str] | None = None

    def own(self, i: int) -> str:
        return f"{NET}.{i}.2"

    def public(self, i: int) -> str:
        return f"{NET}.{i}.1"

    def listen(self, i: int) -> str:
        return f"/ip4/{self.own(i)}/tcp/{PORT}"

    def announce(self, i: int) -> str:
        return f"/ip4/{self.public(i)}/tcp/{PORT}"

    def create(self) -> None:
        """Builds the namespaces and starts the delay proxy (raises if anything fails; call
        `delete` in a finally either way)."""
        for name in [self.router, *self.ns]:
            sh("ip", "netns", "add", name)
            self._created.append(name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "netns", "exec", self.router, "sysctl", "-qw", "net.ipv4.ip_forward=0")
        for i, (ns, (m, r)) in enumerate(zip(self.ns, self._veth, strict=True)):
            sh("ip", "link", "add", m, "netns", ns, "type", "veth", "peer", "name", r,
               "netns", self.router)  # fmt: skip
            sh("ip", "-n", ns, "addr", "add", f"{self.own(i)}/24", "dev", m)
            sh("ip", "-n", self.router, "addr", "add", f"{self.public(i)}/24", "dev", r)
            sh("ip", "-n", ns, "link", "set", m, "up")
            sh("ip", "-n", self.router, "link", "set", r, "up")
            sh("ip", "-n", ns, "route", "add", "prohibit", f"{NET}.0.0/16")
            for j in range(self.members):
                if j != i:
                    sh(
                        "ip",
                        "-n",
                        ns,
                        "route",
                        "add",
                        f"{self.public(j)}/32",
                        "via",
                        self.public(i),
                    )
            if self.rate:
                sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", m, "root", "tbf", "rate",
                   self.rate, "burst", "64kb", "latency", "400ms")  # fmt: skip
        routes = [f"{self.public(i)}:{PORT}={self.own(i)}:{PORT}" for i in range(self.members)]
        self.proxy = subprocess.Popen(
            ["ip", "netns", "exec", self.router, sys.executable, "-m",
             "petald.testing.delay_proxy", "--delay", str(self.delay), *routes],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert self.proxy.stdout is not None
        line = self.proxy.stdout.readline()  # bounded: the proxy prints or exits
        if line.strip() != "ready":
            raise RuntimeError(f"the delay proxy did not start: {line}{self.proxy.stdout.read()}")

    def cmd(self, i: int, args: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns[i], *args]

    def delete(self) -> None:
        if self.proxy is not None:
            self.proxy.kill()
            self.proxy.wait(timeout=10)
        for name in self._created:
            sh("ip", "netns", "del", name, check=False)
        self._created.clear()
