"""The UDP-Lite stack (``"udplite"``, RFC 3828): the UDP stack on a kernel UDP-Lite socket,
``socket(AF_INET[6], SOCK_DGRAM, IPPROTO_UDPLITE=136)``.

UDP-Lite has UDP's header, except that the length field becomes *Checksum Coverage*: the
number of bytes, counted from the first byte of the UDP-Lite header, that the checksum
covers (RFC 3828 §3.1). 0 means the whole datagram; 8 covers only the header; 8 + N covers
the header and the first N payload bytes; 1..7 are illegal. Damage beyond the coverage
reaches the application instead of being dropped - the point of UDP-Lite for codecs that
tolerate bit errors.

Options (``ctx.options``, from config ``[stacks.udplite]`` or a decision):

* ``send_cscov`` - the coverage of datagrams sent (``UDPLITE_SEND_CSCOV``, 10); default 0
  (full coverage).
* ``recv_cscov`` - the least coverage accepted on received datagrams
  (``UDPLITE_RECV_CSCOV``, 11): the kernel drops datagrams covered less; default 0 (not
  set: accept any coverage).
* ``dscp``.

Both coverages take 0 or 8..65535. Everything else - connected non-blocking socket,
SO_MARK, SO_BINDTODEVICE, batch draining through the shared ``ReaderMux``, drops on
EAGAIN, ``retarget`` in place, DSCP - is the UDP stack's code, inherited (``open`` with
this socket protocol and the coverages set before ``connect``). Runs of datagrams
(``send_many``/``send_gso``) go out one ``send`` each: the kernel refuses ``UDP_SEGMENT``
on UDP-Lite (EIO), so UDP GSO and GRO stay off.
"""

from __future__ import annotations

import _socket
import socket
from collections.abc import Mapping
from typing import Any

from vstack.execution.stacks.base import register_stack
from vstack.execution.stacks.tcp import check_dscp, option_error
from vstack.execution.stacks.udp import UdpStack

IPPROTO_UDPLITE = getattr(socket, "IPPROTO_UDPLITE", 136)
UDPLITE_SEND_CSCOV = getattr(socket, "UDPLITE_SEND_CSCOV", 10)
UDPLITE_RECV_CSCOV = getattr(socket, "UDPLITE_RECV_CSCOV", 11)
UDPLITE_OPTIONS = frozenset({"send_cscov", "recv_cscov", "dscp"})


def cscov(stack: str, opts: dict[str, Any], key: str) -> int:
    """A checksum coverage option: 0 (full) or 8..65535 (RFC 3828 §3.1)."""
    v = opts.get(key, 0)
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int) or not (v == 0 or 8 <= v <= 0xFFFF):
        raise option_error(stack, key, v, "0 (full coverage) or 8..65535 (8 + covered "
                                          "payload bytes)")
    return v


def set_cscov(s: _socket.socket, send: int, recv: int) -> None:
    if send:
        s.setsockopt(IPPROTO_UDPLITE, UDPLITE_SEND_CSCOV, send)
    if recv:
        s.setsockopt(IPPROTO_UDPLITE, UDPLITE_RECV_CSCOV, recv)


@register_stack
class UdpLiteStack(UdpStack):
    name = "udplite"
    ipproto = IPPROTO_UDPLITE
    udp_gso = False  # the kernel refuses UDP_SEGMENT on UDP-Lite (EIO): one send each

    @classmethod
    def check_options(cls, options: Mapping[str, Any] | None) -> dict[str, Any]:
        """Validate options without building a stack (``ValueError`` naming the key)."""
        opts = dict(options or {})
        unknown = sorted(set(opts) - UDPLITE_OPTIONS)
        if unknown:
            raise ValueError(f"stacks.udplite: unknown option(s) {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(UDPLITE_OPTIONS))})")
        return {"send_cscov": cscov(cls.name, opts, "send_cscov"),
                "recv_cscov": cscov(cls.name, opts, "recv_cscov"),
                "dscp": check_dscp(cls.name, opts.get("dscp"))}

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        o = self.check_options(ctx.options)
        self.send_cscov: int = o["send_cscov"]
        self.recv_cscov: int = o["recv_cscov"]

    def _configure(self, s: _socket.socket) -> None:
        set_cscov(s, self.send_cscov, self.recv_cscov)
