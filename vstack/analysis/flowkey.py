"""The flow key: the ID extractor's output (5-tuple; direction is carried by the caller).

A ``FlowKey`` is always written from the application's point of view: ``src`` is the
application, ``dst`` is the (virtual) destination it talks to.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

PROTO_NAMES: dict[int, str] = {
    1: "icmp", 6: "tcp", 17: "udp", 33: "dccp", 58: "icmp6", 136: "udplite",
}
PROTO_NUMBERS: dict[str, int] = {v: k for k, v in PROTO_NAMES.items()}

_KEY_RE = re.compile(r"^(?P<proto>[a-z0-9]+):(?P<src>\[[^\]]+\]|[^:\[\]]+):(?P<sport>\d+)"
                     r"->(?P<dst>\[[^\]]+\]|[^:\[\]]+):(?P<dport>\d+)$")


def _fmt(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


@dataclass(frozen=True, slots=True)
class FlowKey:
    """5-tuple of a flow, application side first. Ports are 0 for port-less protocols
    (ICMP uses the echo identifier as ``sport``)."""

    proto: int
    src: str
    sport: int
    dst: str
    dport: int

    @property
    def family(self) -> int:
        return 6 if ":" in self.dst else 4

    @property
    def proto_name(self) -> str:
        return PROTO_NAMES.get(self.proto, str(self.proto))

    def __str__(self) -> str:
        return f"{self.proto_name}:{_fmt(self.src, self.sport)}->{_fmt(self.dst, self.dport)}"

    @classmethod
    def parse(cls, text: str) -> FlowKey:
        """Inverse of ``str()``: ``udp:10.0.0.1:5000->10.201.1.2:9000`` or
        ``udp:[fd00::1]:5000->[fd01::2]:9000``. Raises ValueError on bad input."""
        m = _KEY_RE.match(text.strip())
        if not m:
            raise ValueError(f"not a flow key: {text!r} (expected PROTO:SRC:PORT->DST:PORT)")
        proto_s = m["proto"]
        proto = PROTO_NUMBERS.get(proto_s)
        if proto is None:
            if not proto_s.isdigit():
                raise ValueError(f"unknown protocol {proto_s!r} in flow key {text!r}")
            proto = int(proto_s)
        src, dst = m["src"].strip("[]"), m["dst"].strip("[]")
        for a in (src, dst):
            ipaddress.ip_address(a)
        return cls(proto, src, int(m["sport"]), dst, int(m["dport"]))
