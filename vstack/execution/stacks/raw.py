"""The raw stack: the packet leaves unchanged, handed to the kernel's own forwarding.

Packets of protocols that have no stack (TCP, ICMP, ...) are written as they are through
a raw IP socket (IPv4: ``IPPROTO_RAW``, which implies ``IP_HDRINCL``; IPv6:
``IPPROTO_RAW``, header included) carrying ``SO_MARK``: they leave by the main routing
table, the nftables table of the VNIC masquerades them (their source is the TUN's address),
and conntrack de-NATs the replies straight to the application's socket (their destination
is a local address). See ``docs/datapath.md``. The two raw sockets are shared by all flows
(``RawSockets``, owned by the datapath and passed in ``ctx.options["raw"]``).
"""

from __future__ import annotations

import socket

from vstack.execution.stacks.base import Stack, StackContext, StackError, register_stack

SO_MARK = getattr(socket, "SO_MARK", 36)


class RawSockets:
    """The datapath's two raw sockets (one per family)."""

    def __init__(self, fwmark: int) -> None:
        self.v4 = self._open(socket.AF_INET, fwmark)
        self.v6 = self._open(socket.AF_INET6, fwmark)

    @staticmethod
    def _open(fam: int, fwmark: int) -> socket.socket | None:
        try:
            s = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW)
        except OSError:
            return None
        s.setblocking(False)
        if fwmark:
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, fwmark)
        return s

    def close(self) -> None:
        for s in (self.v4, self.v6):
            if s is not None:
                s.close()


@register_stack
class RawStack(Stack):
    name = "raw"
    carries = "packet"  # send() takes the whole IP packet, not the payload

    def __init__(self, ctx: StackContext) -> None:
        super().__init__(ctx)
        self.errors = 0
        raw = ctx.options.get("raw")
        if not isinstance(raw, RawSockets):
            raise ValueError("raw stack: ctx.options['raw'] must be the datapath's RawSockets")
        sock = raw.v4 if ctx.family == 4 else raw.v6
        if sock is None:
            raise ValueError(f"raw stack: no raw IPv{ctx.family} socket")
        self._sendto = sock.sendto
        self._addr: tuple[str, int] = (ctx.target[0], 0)

    def open(self) -> None:
        pass

    def send(self, payload: bytes | memoryview) -> None:
        try:
            self._sendto(payload, self._addr)
        except OSError as e:
            self.errors += 1
            self.metrics.drops += 1
            if self.errors == 1 or self.errors % 1000 == 0:
                self.ctx.on_error(StackError(self.name, f"{e.strerror} ({self.errors} errors)",
                                             False))
            return
        m = self.metrics
        m.packets_out += 1
        m.bytes_out += len(payload)

    def retarget(self, target: tuple[str, int]) -> None:
        self.ctx.target = target
        self._addr = (target[0], 0)

    def close(self) -> None:
        pass
