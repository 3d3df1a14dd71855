"""The UDP stack: one connected, non-blocking kernel UDP socket per flow (and target).

The socket carries ``SO_MARK`` (the VNIC's fwmark: it leaves by the main routing table and
never loops back into the TUN) and ``SO_BINDTODEVICE`` when the flow is pinned to an
interface. Replies are read from the event loop through the loop's shared epoll
(``ReaderMux``, one registration per socket), drained until EAGAIN (at most ``batch`` per
wakeup), and handed to the endpoint. ``retarget`` reconnects in place.
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import logging
import socket
import sys

from vstack.execution.stacks.base import ReaderMux, Stack, StackContext, StackError, register_stack

SO_MARK = getattr(socket, "SO_MARK", 36)
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
RECV_BATCH = 256
BUF_SIZE = 4 << 20
SOL_UDP = 17
UDP_SEGMENT = 103  # linux/udp.h: UDP GSO, the segment size as a u16 cmsg
UDP_GRO = 104  # linux/udp.h: coalesce received datagrams; the segment size as an int cmsg
_GRO_CMSG = socket.CMSG_SPACE(4)
_DGRAM_NB = socket.SOCK_DGRAM | getattr(socket, "SOCK_NONBLOCK", 0)
_GSO_FAILED = (errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT)
log = logging.getLogger("vstack.stack.udp")


@register_stack
class UdpStack(Stack):
    """One per UDP flow: slots, no bound methods kept, and readability through the
    loop's shared ``ReaderMux`` rather than an ``add_reader`` each (issue 6, flow scale:
    ~1 KB less per flow)."""

    name = "udp"
    __slots__ = ("_gro", "_sock", "errors", "gso")

    ipproto = 0  # the socket's protocol (UDP-Lite: IPPROTO_UDPLITE)
    udp_gso = True  # UDP_SEGMENT sends and UDP_GRO receives (UDP-Lite: no)

    def __init__(self, ctx: StackContext) -> None:
        super().__init__(ctx)
        self._sock: _socket.socket | None = None
        self.errors = 0
        self.gso = False
        self._gro = False

    def open(self) -> None:
        if self._sock is not None:
            return
        ctx = self.ctx
        fam = socket.AF_INET if ctx.family == 4 else socket.AF_INET6
        # the C socket type, non-blocking from socket(2) on: socket.socket's Python
        # __init__ and a setblocking ioctl were ~9 % of a new UDP flow (py-spy, issue 6)
        s = _socket.socket(fam, _DGRAM_NB, self.ipproto)
        try:
            if ctx.fwmark:
                s.setsockopt(socket.SOL_SOCKET, SO_MARK, ctx.fwmark)
            if ctx.interface:
                s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, ctx.interface.encode())
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, opt, BUF_SIZE)
            dscp = ctx.options.get("dscp")
            if dscp is not None:
                self._set_tos(s, int(dscp))
            self._configure(s)
            s.connect(ctx.target)
        except OSError:
            s.close()
            raise
        self._sock = s
        self.gso = self.udp_gso
        if self.udp_gso and ctx.options.get("gro") and ctx.deliver_gso is not None:
            try:
                s.setsockopt(SOL_UDP, UDP_GRO, 1)
                self._gro = True
            except OSError as e:
                log.warning("UDP_GRO refused (%s): receiving datagrams one by one", e.strerror)
        ReaderMux.of(ctx.loop).add(s.fileno(), self)

    def on_readable(self) -> None:
        if self._gro:
            self._readable_gro()
        else:
            self._readable()

    def _configure(self, s: _socket.socket) -> None:
        """Protocol socket options, set before ``connect`` (UDP: none)."""

    def _set_tos(self, s: _socket.socket, dscp: int) -> None:
        if self.ctx.family == 4:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, (dscp & 0x3F) << 2)
        else:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, (dscp & 0x3F) << 2)

    def set_dscp(self, dscp: int) -> None:
        if self._sock is not None:
            self._set_tos(self._sock, dscp)

    def send(self, payload: bytes | memoryview) -> None:
        s = self._sock
        if s is None:  # closed
            self.metrics.drops += 1
            return
        try:
            s.send(payload)
        except BlockingIOError:
            self.metrics.drops += 1
            return
        except OSError as e:
            self._error(e)
            return
        m = self.metrics
        m.packets_out += 1
        m.bytes_out += len(payload)

    def send_many(self, payloads: list[memoryview]) -> None:
        """Send datagrams of equal size (the last may be shorter) with one ``sendmsg``
        and a ``UDP_SEGMENT`` cmsg: the kernel cuts them apart again (UDP GSO), so the
        receiver sees exactly these datagrams. Falls back to one ``send`` each where the
        kernel or the route refuses GSO."""
        n = len(payloads)
        if n == 1 or not self.gso:
            for p in payloads:
                self.send(p)
            return
        size = len(payloads[0])
        s = self._sock
        if s is None:
            self.metrics.drops += n
            return
        try:
            s.sendmsg(payloads, [(SOL_UDP, UDP_SEGMENT,
                                      size.to_bytes(2, sys.byteorder))])
        except BlockingIOError:
            self.metrics.drops += n
            return
        except OSError as e:
            if self._gso_refused(e):
                for p in payloads:
                    self.send(p)
            return
        m = self.metrics
        m.packets_out += n
        m.bytes_out += size * (n - 1) + len(payloads[-1])

    def send_gso(self, payload: memoryview, seg: int) -> None:
        """Send ``payload`` as datagrams of ``seg`` bytes (the last may be shorter) with one
        ``sendmsg`` of one buffer and ``UDP_SEGMENT`` (a USO super-packet's payload from
        the TUN, issue 6: no per-datagram slicing). Falls back like ``send_many``."""
        n = len(payload)
        count = -(-n // seg)
        s = self._sock
        if not self.gso or s is None:
            self.send_many([payload[i:i + seg] for i in range(0, n, seg)])
            return
        try:
            s.sendmsg((payload,), [(SOL_UDP, UDP_SEGMENT, seg.to_bytes(2, sys.byteorder))])
        except BlockingIOError:
            self.metrics.drops += count
            return
        except OSError as e:
            if self._gso_refused(e):
                self.send_many([payload[i:i + seg] for i in range(0, n, seg)])
            return
        m = self.metrics
        m.packets_out += count
        m.bytes_out += n

    def _gso_refused(self, e: OSError) -> bool:
        """A GSO ``sendmsg`` failed with ``e``. True where the kernel or the route refuses
        GSO: it is off from now on (logged once) and the caller sends one by one;
        otherwise the error is counted and reported (False)."""
        if e.errno in _GSO_FAILED:
            self.gso = False
            log.warning("UDP GSO refused towards %s (%s): sending datagrams one by one",
                        self.ctx.target, e.strerror)
            return True
        self._error(e)
        return False

    def _error(self, e: OSError) -> None:
        self.errors += 1
        self.metrics.drops += 1
        if self.errors == 1 or self.errors % 1000 == 0:
            remote = e.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH)
            self.ctx.on_error(StackError(self.name, f"{e.strerror} ({self.errors} errors)",
                                         remote))

    def _readable(self) -> None:
        s = self._sock
        if s is None:
            return
        recv = s.recv
        deliver = self.ctx.deliver
        m = self.metrics
        for _ in range(RECV_BATCH):
            try:
                data = recv(65535)
            except BlockingIOError:
                return
            except OSError as e:
                self._error(e)
                return
            m.packets_in += 1
            m.bytes_in += len(data)
            deliver(data)

    def _readable_gro(self) -> None:
        """Replies with ``UDP_GRO``: one receive may hold many datagrams of the size the
        ``UDP_GRO`` cmsg gives; handed on whole (one super-packet into the TUN)."""
        s = self._sock
        if s is None:
            return
        recvmsg = s.recvmsg
        deliver = self.ctx.deliver
        deliver_gso = self.ctx.deliver_gso
        assert deliver_gso is not None
        m = self.metrics
        for _ in range(RECV_BATCH):
            try:
                data, anc, _flags, _addr = recvmsg(65535, _GRO_CMSG)
            except BlockingIOError:
                return
            except OSError as e:
                self._error(e)
                return
            n = len(data)
            seg = 0
            for level, kind, val in anc:
                if level == SOL_UDP and kind == UDP_GRO:
                    seg = int.from_bytes(val[:4], sys.byteorder)
            m.bytes_in += n
            if 0 < seg < n:
                m.packets_in += -(-n // seg)
                deliver_gso(data, seg)
            else:
                m.packets_in += 1
                deliver(data)

    def retarget(self, target: tuple[str, int]) -> None:
        self.ctx.target = target
        if self._sock is not None:
            self._sock.connect(target)

    def close(self) -> None:
        s = self._sock
        if s is None:
            return
        self._sock = None
        with contextlib.suppress(ValueError, RuntimeError, OSError):
            ReaderMux.of(self.ctx.loop).remove(s.fileno())
        s.close()
