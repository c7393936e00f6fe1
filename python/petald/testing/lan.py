"""`Lan`: peers in network namespaces joined by one forwarding router, which can partition a
group of them from the rest and heal it again (needs root).

    member i ns:  m<i>  10.214.<i+1>.2/24  default route via the router
                   |  veth
    router ns:    r<i>  10.214.<i+1>.1/24  ip_forward=1
                   |  veth
    root ns:      h     10.214.0.2/24      10.214.0.0/16 via the router (the test process)

Every member reaches every other, and the test process in the root namespace reaches them all,
at their own addresses: unlike petald.testing.wan there is no proxy, so a TCP connection runs
end to end and a partition acts on it as a real one does. `cut(group)` makes the router drop,
silently, every packet between the group's members and everyone else (root namespace
included): policy rules of type blackhole, which send no ICMP error and no RST, so established
connections stall (retransmitting with backoff) and new ones time out, as on a broken link.
Members of one side still reach each other. `heal(group)` deletes the rules; stalled
connections resume at their next retransmission. Port 4001 is fixed because each namespace
has a port space of its own, used by nothing else."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Sequence

from petald.testing.wan import sh

PORT = 4001
NET = "10.214"
CUT_PREF = 100  # the blackhole rules' priority: before the main table's (32766)


class Lan:
    def __init__(self, members: int) -> None:
        if not 1 <= members <= 200:
            raise ValueError("members must be 1..200")
        sfx = f"{os.getpid() % 10000}{secrets.token_hex(2)}"  # veth names fit in 15 characters
        self.members = members
        self.router = f"petald-r{sfx}"
        self.ns = [f"petald-l{i}-{sfx}" for i in range(members)]
        self._veth = [(f"l{i}x{sfx}", f"q{i}x{sfx}") for i in range(members)]
        self._host_veth = (f"h0x{sfx}", f"q-hx{sfx}")
        self._created: list[str] = []
        self._cut: set[int] = set()

    def addr(self, i: int) -> str:
        return f"{NET}.{i + 1}.2"

    def listen(self, i: int) -> str:
        return f"/ip4/{self.addr(i)}/tcp/{PORT}"

    def _subnet(self, i: int | None) -> str:
        """Member i's /24; None: the root namespace's."""
        return f"{NET}.{0 if i is None else i + 1}.0/24"

    def create(self) -> None:
        """Builds the namespaces and links (raises if anything fails, e.g. `ip netns add` not
        permitted; call `delete` in a finally either way)."""
        for name in [self.router, *self.ns]:
            sh("ip", "netns", "add", name)
            self._created.append(name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "netns", "exec", self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for i, (ns, (m, r)) in enumerate(zip(self.ns, self._veth, strict=True)):
            sh("ip", "link", "add", m, "netns", ns, "type", "veth", "peer", "name", r,
               "netns", self.router)  # fmt: skip
            sh("ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", m)
            sh("ip", "-n", self.router, "addr", "add", f"{NET}.{i + 1}.1/24", "dev", r)
            sh("ip", "-n", ns, "link", "set", m, "up")
            sh("ip", "-n", self.router, "link", "set", r, "up")
            sh("ip", "-n", ns, "route", "add", "default", "via", f"{NET}.{i + 1}.1")
        # The root namespace's link: its end goes when the router's namespace is deleted.
        h, r = self._host_veth
        sh("ip", "link", "add", h, "type", "veth", "peer", "name", r, "netns", self.router)
        sh("ip", "addr", "add", f"{NET}.0.2/24", "dev", h)
        sh("ip", "-n", self.router, "addr", "add", f"{NET}.0.1/24", "dev", r)
        sh("ip", "link", "set", h, "up")
        sh("ip", "-n", self.router, "link", "set", r, "up")
        sh("ip", "route", "add", f"{NET}.0.0/16", "via", f"{NET}.0.1")

    def _rules(self, group: Iterable[int]) -> list[list[str]]:
        inside = set(group)
        if not inside <= set(range(self.members)):
            raise ValueError(f"members are 0..{self.members - 1}, not {sorted(inside)}")
        outside: list[int | None] = [None, *(j for j in range(self.members) if j not in inside)]
        rules = []
        for i in sorted(inside):
            for j in outside:
                for a, b in ((i, j), (j, i)):
                    rules.append(["from", self._subnet(a), "to", self._subnet(b)])
        return rules

    def cut(self, group: Sequence[int]) -> None:
        """Partitions `group` from the other members and the root namespace."""
        for rule in self._rules(group):
            sh("ip", "-n", self.router, "rule", "add", *rule, "blackhole", "pref", str(CUT_PREF))
        self._cut |= set(group)

    def heal(self, group: Sequence[int]) -> None:
        """Undoes `cut(group)`."""
        for rule in self._rules(group):
            sh("ip", "-n", self.router, "rule", "del", *rule, "blackhole", "pref", str(CUT_PREF))
        self._cut -= set(group)

    def cmd(self, i: int, args: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns[i], *args]

    def delete(self) -> list[str]:
        """Deletes what was created (the veths and rules go with their namespaces); returns
        the names still listed afterwards."""
        for name in self._created:
            sh("ip", "netns", "del", name, check=False)
        listed = sh("ip", "netns", "list", check=False).stdout
        left = [n for n in self._created if n in listed]
        self._created.clear()
        return left
