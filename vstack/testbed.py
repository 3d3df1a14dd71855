"""The network-namespace testbed shared by the tests, ``vstack demo`` and ``vstack bench``.

::

      edge netns (app + vstack + TUN)              server netns
      ┌──────────────────────────────┐            ┌──────────────────────┐
      │ e1-<sfx> 10.201.1.1/24       ├── veth ────┤ s1-<sfx> 10.201.1.2  │
      │          fd01:1::1/64        │            │          fd01:1::2   │
      │ e2-<sfx> 10.201.2.1/24       ├── veth ────┤ s2-<sfx> 10.201.2.2  │
      │          fd01:2::1/64        │            │          fd01:2::2   │
      └──────────────────────────────┘            └──────────────────────┘

The edge namespace's default routes (IPv4 and IPv6) point at the server over link 1.

Names carry a random suffix (other test runs build their own testbeds at the same time);
every namespace, veth and process the testbed starts is removed by ``close()``, which the
context manager, an ``atexit`` hook and SIGTERM all reach.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Link:
    edge_if: str
    server_if: str
    edge4: str
    server4: str
    edge6: str
    server6: str


class TestbedError(RuntimeError):
    pass


class Testbed:
    """``with Testbed() as tb:`` builds the namespaces; ``tb.run(tb.edge, argv)``."""

    __test__ = False  # not a pytest test class

    def __init__(self, prefix: str = "vs", links: int = 2) -> None:
        if os.geteuid() != 0:
            raise TestbedError("the testbed needs root (network namespaces, veth)")
        sfx = f"{os.getpid() % 1000:03d}{secrets.token_hex(2)}"
        self.suffix = sfx
        self.edge = f"{prefix}e-{sfx}"
        self.server = f"{prefix}s-{sfx}"
        self.links = [
            Link(f"e{i}-{sfx}", f"s{i}-{sfx}", f"10.201.{i}.1", f"10.201.{i}.2",
                 f"fd01:{i}::1", f"fd01:{i}::2")
            for i in range(1, links + 1)
        ]
        self._procs: list[subprocess.Popen[Any]] = []
        self._built = False
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Testbed:
        self.build()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def build(self) -> None:
        from pyroute2 import IPRoute, NetNS, netns

        atexit.register(self.close)
        self._built = True
        try:
            netns.create(self.edge)
            netns.create(self.server)
            with IPRoute() as ipr:
                for ln in self.links:
                    ipr.link("add", ifname=ln.edge_if, kind="veth", peer=ln.server_if)
                    ipr.link("set", index=ipr.link_lookup(ifname=ln.edge_if)[0],
                             net_ns_fd=self.edge)
                    ipr.link("set", index=ipr.link_lookup(ifname=ln.server_if)[0],
                             net_ns_fd=self.server)
            for ns, side in ((self.edge, "edge"), (self.server, "server")):
                self._sysctl(ns, "net/ipv6/conf/all/accept_dad", "0")
                self._sysctl(ns, "net/ipv6/conf/default/accept_dad", "0")
                with NetNS(ns) as n:
                    n.link("set", index=n.link_lookup(ifname="lo")[0], state="up")
                    for ln in self.links:
                        ifname = ln.edge_if if side == "edge" else ln.server_if
                        a4 = ln.edge4 if side == "edge" else ln.server4
                        a6 = ln.edge6 if side == "edge" else ln.server6
                        idx = n.link_lookup(ifname=ifname)[0]
                        n.addr("add", index=idx, address=a4, prefixlen=24)
                        n.addr("add", index=idx, address=a6, prefixlen=64, flags=0x02)
                        n.link("set", index=idx, state="up")
                    if side == "edge":
                        # the first link is the edge host's default route ("the internet")
                        ln = self.links[0]
                        n.route("add", dst="0.0.0.0/0", gateway=ln.server4)
                        n.route("add", dst="::/0", gateway=ln.server6, family=socket.AF_INET6)
        except Exception as e:
            self.close()
            raise TestbedError(f"building the testbed: {e}") from e

    def close(self) -> None:
        if self._closed or not self._built:
            return
        self._closed = True
        for p in self._procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.terminate()
        deadline = time.monotonic() + 3
        for p in self._procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait()
        from pyroute2 import netns

        for ns in (self.edge, self.server):
            # processes we did not start might still sit in the namespace; kill them so
            # the namespace (and its veths) really goes away
            with contextlib.suppress(Exception):
                out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                     text=True, timeout=5).stdout.split()
                for pid in out:
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), 9)
            with contextlib.suppress(Exception):
                netns.remove(ns)
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _sysctl(ns: str, path: str, value: str) -> None:
        subprocess.run(["ip", "netns", "exec", ns, "sh", "-c",
                        f"echo {value} > /proc/sys/{path}"], check=False, capture_output=True)

    @staticmethod
    def argv(ns: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def run(self, ns: str, argv: Sequence[str], *, check: bool = True, timeout: float = 60,
            **kw: Any) -> subprocess.CompletedProcess[str]:
        kw.setdefault("capture_output", True)
        p = subprocess.run(self.argv(ns, argv), text=True, timeout=timeout, check=False, **kw)
        if check and p.returncode != 0:
            raise TestbedError(f"{' '.join(argv)} in {ns} exited {p.returncode}: "
                               f"{(p.stderr or '').strip()[-2000:]}")
        return p

    def popen(self, ns: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        p: subprocess.Popen[Any] = subprocess.Popen(self.argv(ns, argv), **kw)
        self._procs.append(p)
        return p


def wait_line(p: subprocess.Popen[str], needle: str, timeout: float,
               sink: list[str] | None = None) -> str:
    """Read lines of ``p.stdout`` until one contains ``needle``."""
    assert p.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            if p.poll() is not None:
                break
            continue
        if sink is not None:
            sink.append(line)
        if needle in line:
            return line
    raise RuntimeError(f"no {needle!r} from {p.args!r} (rc={p.poll()}); "
                       f"output: {''.join(sink or [])[-2000:]}")
