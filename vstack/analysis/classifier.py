"""Classifier and ID extractor (sans-IO): raw IP packet -> `Classification` / `FlowKey`.

* :func:`classify` parses a packet (raising :class:`~vstack.analysis.packet.ParseError` for
  anything malformed) and returns the protocol, ports, TCP flags, lengths, DSCP and the flow
  key.  :meth:`Classification.fields` gives exactly the ``FLOW_FIELDS`` of
  :mod:`vstack.decision.events`; :func:`flow_new_event` wraps them in a ``flow.new`` event.
* :func:`flow_key` is the ID extractor.  A :class:`FlowKey` is always written application side
  first; ``direction`` says which way the packet travelled: ``APP_TO_NET`` (read from the
  TUN: source = application) or ``NET_TO_APP`` (a reply: destination = application).
  ICMP/ICMPv6 echo messages use the echo identifier as ``sport`` and 0 as ``dport`` in both
  directions (the identifier names the flow on both sides).
* :func:`reverse` swaps the two ends of a key (the wire view of the other direction);
  :func:`wire_key` is a cheap hashable per-packet key for the datapath's hot path.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from vstack.analysis.flowkey import FlowKey
from vstack.analysis.packet import (
    ICMP,
    ICMPV6,
    TCP,
    UDP,
    UDPLITE,
    ICMPHeader,
    IPPacket,
    ParseError,
    TCPHeader,
    fast_constructor,
    parse,
    tcp_flags_str,
    tcp_flags_value,
)
from vstack.decision.events import Event

__all__ = [
    "Classification",
    "Direction",
    "ParseError",
    "classify",
    "flow_key",
    "flow_new_event",
    "note_fields",
    "reverse",
    "wire_key",
]


class Direction(enum.Enum):
    """Which way a packet travels relative to the application behind the VNIC."""

    APP_TO_NET = "app->net"  # read from the TUN: src is the application
    NET_TO_APP = "net->app"  # a reply towards the application: dst is the application

    def reversed(self) -> Direction:
        return Direction.NET_TO_APP if self is Direction.APP_TO_NET else Direction.APP_TO_NET


@dataclass(frozen=True, slots=True)
class Classification:
    """What the classifier knows about one packet (see :func:`classify`)."""

    key: FlowKey
    proto: int
    proto_name: str
    family: int
    tcp_flags: str  # "S", "SA", "FA", ... ("" for non-TCP)
    sport: int  # application-side port (ICMP echo: identifier)
    dport: int  # network-side port (ICMP: 0)
    length: int  # IP total length
    payload_len: int  # transport payload length
    dscp: int
    fragment: bool
    direction: Direction
    packet: IPPacket

    @property
    def src(self) -> str:
        return self.key.src

    @property
    def dst(self) -> str:
        return self.key.dst

    @property
    def payload_offset(self) -> int:
        return self.packet.payload_offset

    def fields(self, *, iface: str = "", stack: str = "") -> dict[str, Any]:
        """The ``FLOW_FIELDS`` of :mod:`vstack.decision.events`, exactly (``iface`` and
        ``stack`` are filled by the datapath)."""
        k = self.key
        return {
            "flow": str(k),
            "proto": self.proto_name,
            "family": self.family,
            "src": k.src,
            "dst": k.dst,
            "sport": self.sport,
            "dport": self.dport,
            "dscp": self.dscp,
            "tcp_flags": self.tcp_flags,
            "length": self.length,
            "payload_len": self.payload_len,
            "iface": iface,
            "stack": stack,
        }

    def note(self) -> int:
        """What :meth:`fields` says beyond the flow key, packed into one int (a flow keeps
        this rather than its ``flow.new`` fields dict: 32 bytes instead of ~500; issue 6).
        :func:`note_fields` gives the fields back. Only meaningful for APP_TO_NET packets
        (whose ports are the key's)."""
        n, pl, f = self.length, self.payload_len, self.tcp_flags
        return ((n if n < _M20 else _M20) | (pl if pl < _M20 else _M20) << 20
                | (self.dscp & 0x3F) << 40 | (tcp_flags_value(f) if f else 0) << 46)


_M20 = (1 << 20) - 1


def note_fields(key: FlowKey, note: int, *, iface: str = "", stack: str = "") -> dict[str, Any]:
    """The ``FLOW_FIELDS`` of a flow's first packet from its key and
    :meth:`Classification.note` (equal to that packet's ``Classification.fields``)."""
    return {
        "flow": str(key),
        "proto": key.proto_name,
        "family": key.family,
        "src": key.src,
        "dst": key.dst,
        "sport": key.sport,
        "dport": key.dport,
        "dscp": note >> 40 & 0x3F,
        "tcp_flags": tcp_flags_str(note >> 46 & 0xFF),
        "length": note & _M20,
        "payload_len": note >> 20 & _M20,
        "iface": iface,
        "stack": stack,
    }


def _ports(p: IPPacket) -> tuple[int, int]:
    """(source port, destination port) as on the wire; ICMP echo: (ident, 0)."""
    l4 = p.l4
    if l4 is None:
        return 0, 0
    if isinstance(l4, ICMPHeader):
        return (l4.ident or 0), 0
    return l4.sport, l4.dport


def _key(p: IPPacket, direction: Direction) -> tuple[FlowKey, int, int]:
    sp, dp = _ports(p)
    if 0 <= sp < 65536 and 0 <= dp < 65536:  # one shared int object per port number
        sp, dp = _PORT_INTS[sp], _PORT_INTS[dp]
    if direction is Direction.APP_TO_NET:
        return _new_key(p.proto, p.src, sp, p.dst, dp), sp, dp
    if p.proto == ICMP or p.proto == ICMPV6:  # the echo identifier names both directions
        return _new_key(p.proto, p.dst, sp, p.src, dp), sp, dp
    return _new_key(p.proto, p.dst, dp, p.src, sp), dp, sp


def classify(buf: bytes | bytearray | memoryview,
             direction: Direction = Direction.APP_TO_NET) -> Classification:
    """Classify one raw IP packet.  Raises :class:`ParseError` if it is malformed."""
    p = parse(buf)
    key, sp, dp = _key(p, direction)
    l4 = p.l4
    flags = tcp_flags_str(l4.flags) if isinstance(l4, TCPHeader) else ""
    return _new_cls(key, p.proto, key.proto_name, p.version, flags, sp, dp, p.total_len,
                    p.payload_len, p.dscp, p.fragment, direction, p)


def flow_key(buf: bytes | bytearray | memoryview,
             direction: Direction = Direction.APP_TO_NET) -> FlowKey:
    """The ID extractor: the packet's flow key, application side first."""
    return _key(parse(buf), direction)[0]


def reverse(key: FlowKey) -> FlowKey:
    """Swap the ends of ``key`` (addresses and ports): the 5-tuple of the opposite
    direction as it appears on the wire."""
    return FlowKey(key.proto, key.dst, key.dport, key.src, key.sport)


def flow_new_event(cls: Classification, now: float, *, iface: str = "",
                   stack: str = "") -> Event:
    """The ``flow.new`` event for the first packet of a flow."""
    return _new_event("flow.new", now, cls.fields(iface=iface, stack=stack), cls.key)


# the per-new-flow objects skip the dataclasses' __init__ (object.__setattr__ per field:
# about twice as slow; issue 6, bench flows)
_new_cls = fast_constructor(Classification)
# every port number as one shared int: a flow key keeps two ports, and ints above 256 are
# a 32-byte object each (64 bytes per flow; this table is a fixed 2.6 MB; issue 6)
_PORT_INTS: tuple[int, ...] = tuple(range(65536))
_new_key = fast_constructor(FlowKey)
_new_event = fast_constructor(Event)
_PORTED = frozenset({UDP, TCP, UDPLITE})


def wire_key(buf: bytes | bytearray | memoryview) -> bytes | None:
    """A cheap hashable key naming the 5-tuple of an app->net packet, or ``None``.

    Only the common fast cases get one: IPv4 without options and not a fragment, or IPv6
    without extension headers, carrying UDP, UDP-Lite or TCP.  It is the packet's bytes
    ``proto + addresses + ports`` (no parsing, no validation): the caller maps it to a flow
    it created after a full :func:`classify`, and falls back to :func:`classify` when the key
    is ``None`` or unknown.  Equal 5-tuples give equal keys; different ones differ.
    """
    n = len(buf)
    if n >= 24 and buf[0] == 0x45:
        if buf[9] in _PORTED and not (buf[6] & 0x3F or buf[7]):
            return bytes(buf[9:10]) + bytes(buf[12:24])
        return None
    if n >= 44 and buf[0] >> 4 == 6 and buf[6] in _PORTED:
        return bytes(buf[6:7]) + bytes(buf[8:44])
    return None
