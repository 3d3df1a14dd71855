"""Thin I/O adapters that move encoded DCCP packets: raw IP protocol 33, and DCCP-UDP.

Nothing here knows DCCP semantics beyond what the wire needs:

* :class:`RawDccpSocket` - ``socket(AF_INET[6], SOCK_RAW, 33)``. The kernel hands *every*
  protocol-33 packet of the namespace to *every* such socket, so receivers demultiplex by
  ports (the endpoint does that). AF_INET raw sockets deliver the IPv4 header in front of
  the DCCP packet (we strip it and take the addresses from it); AF_INET6 raw sockets deliver
  only the payload, so the destination address comes from ``IPV6_PKTINFO``. While such a
  socket is open the host kernel sends no ICMP protocol-unreachable for DCCP.
* :class:`UdpDccpSocket` - DCCP-UDP (RFC 6773): an ordinary UDP socket whose payloads are
  whole DCCP packets, generic header with the DCCP ports first (§3, §3.2). The UDP ports
  are where the two ends receive DCCP-UDP, not the DCCP ports (§3.1): ``sendto`` needs the
  peer's UDP port, and received datagrams carry the peer's (``RxDatagram.udp_port``). The
  kernel writes the UDP header and its checksum (never zero: Linux sends a computed zero
  as 0xFFFF, and IPv6 always checksums) and drops datagrams with a wrong checksum or a UDP
  Length past the packet; a classic BPF filter on the socket drops what the kernel would
  let through but RFC 6773 §3.3 does not: a zero UDP checksum (legal UDP over IPv4) and a
  UDP Length under 20. The rest of §3.3 (the DCCP header must fit in the datagram) is
  checked here and counted in ``stats.rx_bad``. The DCCP Checksum field is sent as zero
  and must be ignored on receipt (``dccp_checksum`` is False: the endpoint encodes without
  it and decodes with ``verify=False``). Issue 6: runs of equal-size packets leave with one
  ``UDP_SEGMENT`` sendmsg, and the socket reads with ``UDP_GRO`` (a read may return up to
  64 coalesced datagrams, split into memoryviews; one per read where the kernel refuses).

Both carry SO_MARK (the datapath marks its egress 0x5654 so it bypasses the VNIC) and
SO_BINDTODEVICE. Received datagrams are handed to a callback from the asyncio loop
(``loop.add_reader``); sending never blocks (a full socket buffer counts a drop).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import ctypes
import errno
import ipaddress
import socket
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass

from vstack.dccp.checksum import checksum_coverage, internet_checksum, pseudo_header
from vstack.dccp.packet import DCCP_UDP_MIN_LEN, DccpParseError, check_udp_payload

_SOL_UDP = 17
_UDP_SEGMENT = 103  # linux/udp.h: UDP GSO segment size (u16 cmsg)
_UDP_GRO = 104  # linux/udp.h: receive coalesced datagrams; cmsg (int) = segment size
_ANC_SIZE = 128  # ancillary space: IP(V6)_PKTINFO + UDP_GRO
_GSO_MAX_SEGS = 64
_GSO_MAX_BYTES = 65000
_BYTEORDER = sys.byteorder

IPPROTO_DCCP = 33
IPPROTO_UDP = 17
SO_MARK = getattr(socket, "SO_MARK", 36)
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
DATAPATH_MARK = 0x5654
MAX_DATAGRAM = 65535
_RECV_BATCH = 256


@dataclass(frozen=True, slots=True)
class RxDatagram:
    """One received DCCP packet with the addresses needed for its checksum."""

    src: str  # remote IP address
    dst: str  # our IP address, as on the wire
    data: bytes | memoryview  # the DCCP packet, generic header (DCCP ports) first; DCCP-UDP
    # with UDP_GRO: a memoryview into the coalesced read (valid as long as it is referenced)
    udp_port: int = 0  # DCCP-UDP: the remote UDP port (raw: 0)


class TransportError(OSError):
    """A local socket failure (bad address, permission, bind)."""


def family_of(addr: str) -> int:
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError as e:
        raise TransportError(errno.EINVAL, f"not an IP address: {addr!r}") from e
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


# ------------------------------------------------------------ checksum (RFC 4340 §9)
def dccp_checksum(pkt: bytes, src: str, dst: str, proto: int = IPPROTO_DCCP) -> int:
    """RFC 4340 §9 checksum of ``pkt`` (its checksum field taken as zero), honouring CsCov,
    with ``proto`` in the pseudo-header (diagnostics; the codec computes the real ones)."""
    if len(pkt) < 12:
        raise ValueError("shorter than a DCCP generic header")
    cover = min(checksum_coverage(pkt), len(pkt))
    body = pkt[:6] + b"\0\0" + pkt[8:cover]
    return internet_checksum(pseudo_header(src, dst, len(pkt), proto) + body)


def checksum_ok(pkt: bytes, src: str, dst: str, proto: int = IPPROTO_DCCP) -> bool:
    try:
        return dccp_checksum(pkt, src, dst, proto) == struct.unpack_from("!H", pkt, 6)[0]
    except (ValueError, struct.error, OSError):
        return False


def reprotect(pkt: bytes, src: str, dst: str, proto: int) -> bytes:
    """Return ``pkt`` with its checksum recomputed for pseudo-header protocol ``proto``."""
    c = dccp_checksum(pkt, src, dst, proto)
    return pkt[:6] + struct.pack("!H", c) + pkt[8:]


# ----------------------------------------------------------------------- sockets
@dataclass(slots=True)
class SocketStats:
    rx: int = 0
    tx: int = 0
    tx_drops: int = 0  # EAGAIN/ENOBUFS on send
    tx_gso: int = 0  # DCCP-UDP: sendmsg calls with UDP_SEGMENT (several packets each)
    rx_bad: int = 0  # too short / unparsable IP header
    rx_gro: int = 0  # DCCP-UDP: reads that returned several coalesced datagrams (UDP_GRO)
    rx_errors: int = 0


class DccpSocket(abc.ABC):
    """A source and sink of encoded DCCP packets (see the module docstring)."""

    kind: str = ""
    # The DCCP Checksum field is in use on this transport (raw: RFC 4340 §9). DCCP-UDP:
    # False, the UDP checksum does its job (RFC 6773 §3.3).
    dccp_checksum: bool = True

    def __init__(self, family: int, fwmark: int = 0, device: str | None = None) -> None:
        self.family = family
        self.fwmark = fwmark
        self.device = device
        self.stats = SocketStats()
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_rx: Callable[[RxDatagram], None] | None = None
        self._src_cache: dict[str, str] = {}

    # -- helpers
    def _apply_opts(self, s: socket.socket) -> None:
        try:
            if self.fwmark:
                s.setsockopt(socket.SOL_SOCKET, SO_MARK, self.fwmark)
            if self.device:
                s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, self.device.encode() + b"\0")
        except OSError as e:
            s.close()
            raise TransportError(e.errno, f"socket option (mark/device): {e.strerror}") from e

    @property
    def sock(self) -> socket.socket:
        if self._sock is None:
            raise TransportError(errno.EBADF, "socket closed")
        return self._sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def source_for(self, remote: str) -> str:
        """The local address the kernel will use towards ``remote`` (route lookup, cached)."""
        src = self._src_cache.get(remote)
        if src is None:
            probe = socket.socket(self.family, socket.SOCK_DGRAM)
            try:
                self._apply_opts(probe)
                probe.connect((remote, 9))
                src = str(probe.getsockname()[0])
            except OSError as e:
                raise TransportError(e.errno, f"no route to {remote}: {e.strerror}") from e
            finally:
                probe.close()
            self._src_cache[remote] = src
        return src

    # -- asyncio
    def attach(self, loop: asyncio.AbstractEventLoop, on_rx: Callable[[RxDatagram], None]) -> None:
        self._loop, self._on_rx = loop, on_rx
        loop.add_reader(self.fileno(), self._readable)

    def _readable(self) -> None:
        cb = self._on_rx
        for _ in range(_RECV_BATCH):
            try:
                dg = self.recv_one()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.stats.rx_errors += 1
                return
            if dg is None:
                continue
            if isinstance(dg, list):  # DCCP-UDP with UDP_GRO: the segments of one read
                self.stats.rx += len(dg)
                if cb is not None:
                    for d in dg:
                        cb(d)
                continue
            self.stats.rx += 1
            if cb is not None:
                cb(dg)

    @abc.abstractmethod
    def recv_one(self) -> RxDatagram | list[RxDatagram] | None:
        """Read one datagram (non-blocking); None for one that is not ours / malformed.
        DCCP-UDP with UDP_GRO may return the list of datagrams one read coalesced."""

    @abc.abstractmethod
    def sendto(self, data: bytes | memoryview, remote: str, udp_port: int = 0) -> bool:
        """Send one encoded DCCP packet; False when the kernel dropped it (counted)."""

    def sendto_many(self, datas: list[bytes], remote: str, udp_port: int = 0) -> int:
        """Send several encoded DCCP packets, in order; returns how many left. Default: one
        ``sendto`` each (DCCP-UDP batches them, see :class:`UdpDccpSocket`)."""
        return sum(1 for d in datas if self.sendto(d, remote, udp_port))

    def _send(self, data: bytes | memoryview, addr: tuple[str, int]) -> bool:
        try:
            self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self.stats.tx_drops += 1
            return False
        except OSError as e:
            if e.errno in (errno.ENOBUFS, errno.EAGAIN):
                self.stats.tx_drops += 1
                return False
            raise TransportError(e.errno, f"send to {addr[0]}: {e.strerror}") from e
        self.stats.tx += 1
        return True

    def close(self) -> None:
        s, self._sock = self._sock, None
        if s is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(Exception):
                self._loop.remove_reader(s.fileno())
        s.close()

    def __enter__(self) -> DccpSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RawDccpSocket(DccpSocket):
    """IP protocol 33 over a raw socket (IPv4 or IPv6)."""

    kind = "raw"

    def __init__(self, family: int, bind: str | None = None, fwmark: int = 0,
                 device: str | None = None, rcvbuf: int = 4 << 20) -> None:
        super().__init__(family, fwmark, device)
        try:
            s = socket.socket(family, socket.SOCK_RAW, IPPROTO_DCCP)
        except PermissionError as e:
            raise TransportError(e.errno, "raw sockets need CAP_NET_RAW (run as root)") from e
        self._apply_opts(s)
        s.setblocking(False)
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, rcvbuf)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
        if bind:
            try:
                s.bind((bind, 0))
            except OSError as e:
                s.close()
                raise TransportError(e.errno, f"bind {bind}: {e.strerror}") from e
            self._bound: str | None = bind
        else:
            self._bound = None
        self._sock = s

    def source_for(self, remote: str) -> str:
        return self._bound or super().source_for(remote)

    def filter_port(self, port: int) -> bool:
        """Let the kernel pass only packets whose DCCP destination port is ``port``.

        Every protocol-33 packet reaches every raw socket, so without this each connection's
        socket would wake for all the others' packets. A classic BPF program (SO_ATTACH_FILTER)
        reads the Dest Port: IPv4 raw sockets see the IP header first (skip IHL words),
        IPv6 ones start at the DCCP header. The endpoint still checks the ports itself.
        Returns False (no filter, nothing else changes) if the kernel refuses it.
        """
        if not 0 < port < 65536:
            raise TransportError(errno.EINVAL, f"bad port {port}")
        if self.family == socket.AF_INET:
            prog = [
                (0xB1, 0, 0, 0),  # ldxb 4*([0]&0xf)
                (0x48, 0, 0, 2),  # ldh [x + 2]
                (0x15, 0, 1, port),  # jeq #port, accept, drop
                (0x06, 0, 0, 0xFFFF),  # ret #65535
                (0x06, 0, 0, 0),  # ret #0
            ]
        else:
            prog = [
                (0x28, 0, 0, 2),  # ldh [2]
                (0x15, 0, 1, port),
                (0x06, 0, 0, 0xFFFF),
                (0x06, 0, 0, 0),
            ]
        code = b"".join(struct.pack("HBBI", *ins) for ins in prog)
        buf = ctypes.create_string_buffer(code)
        fprog = struct.pack("HL", len(prog), ctypes.addressof(buf))
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        except OSError:
            return False
        # packets queued before the filter was attached would still be read: drain them
        with contextlib.suppress(BlockingIOError, InterruptedError, OSError):
            for _ in range(1024):
                self.sock.recv(MAX_DATAGRAM)
        return True

    def recv_one(self) -> RxDatagram | None:
        s = self.sock
        if self.family == socket.AF_INET:
            buf, _addr = s.recvfrom(MAX_DATAGRAM)
            if len(buf) < 20 or buf[0] >> 4 != 4:
                self.stats.rx_bad += 1
                return None
            ihl = (buf[0] & 0x0F) * 4
            if ihl < 20 or len(buf) < ihl:
                self.stats.rx_bad += 1
                return None
            src = socket.inet_ntop(socket.AF_INET, buf[12:16])
            dst = socket.inet_ntop(socket.AF_INET, buf[16:20])
            return RxDatagram(src, dst, buf[ihl:])
        data, anc, _flags, addr = s.recvmsg(MAX_DATAGRAM, 64)
        dst = ""
        for level, typ, cdata in anc:
            if level == socket.IPPROTO_IPV6 and typ == IPV6_PKTINFO and len(cdata) >= 16:
                dst = socket.inet_ntop(socket.AF_INET6, cdata[:16])
        if not dst:
            dst = self._bound or "::"
        return RxDatagram(str(addr[0]).split("%", 1)[0], dst, data)

    def sendto(self, data: bytes | memoryview, remote: str, udp_port: int = 0) -> bool:
        return self._send(data, (remote, 0))


# Classic BPF on a UDP socket sees the datagram from the UDP header on (the kernel has
# checked the UDP checksum before it runs the filter). RFC 6773 §3.3: drop a UDP Length
# below 20 and a zero UDP checksum.
_UDP_FILTER = (
    (0x28, 0, 0, 4),  # ldh [4]                  UDP Length
    (0x35, 0, 3, DCCP_UDP_MIN_LEN),  # jge #20, next, drop
    (0x28, 0, 0, 6),  # ldh [6]                  UDP Checksum
    (0x15, 1, 0, 0),  # jeq #0, drop, accept
    (0x06, 0, 0, 0xFFFF),  # accept: ret #65535
    (0x06, 0, 0, 0),  # drop: ret #0
)


class UdpDccpSocket(DccpSocket):
    """DCCP-UDP (RFC 6773): whole DCCP packets as the payloads of UDP ``port`` (0: ephemeral).

    ``filtered`` says whether the kernel took the RFC 6773 §3.3 filter (zero UDP checksum,
    UDP Length < 20); without it those datagrams reach us, and a zero checksum cannot be
    told apart from a computed one.
    """

    kind = "udp"
    dccp_checksum = False

    def __init__(self, family: int, bind: str | None = None, port: int = 0, fwmark: int = 0,
                 device: str | None = None, bufsize: int = 4 << 20, gro: bool = True) -> None:
        super().__init__(family, fwmark, device)
        s = socket.socket(family, socket.SOCK_DGRAM)
        self._apply_opts(s)
        s.setblocking(False)
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            with contextlib.suppress(OSError):
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        else:
            s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        self.filtered = _attach_filter(s, _UDP_FILTER)  # before bind: nothing slips past
        self.gro = gro and _enable_gro(s)
        host = bind or ("::" if family == socket.AF_INET6 else "0.0.0.0")
        try:
            s.bind((host, port))
        except OSError as e:
            s.close()
            raise TransportError(e.errno, f"bind {host}:{port}: {e.strerror}") from e
        self._bound = bind
        self._sock = s
        self.port = int(s.getsockname()[1])

    def source_for(self, remote: str) -> str:
        return self._bound or super().source_for(remote)

    def recv_one(self) -> RxDatagram | list[RxDatagram] | None:
        """One read: one datagram, or with UDP_GRO the datagrams the kernel coalesced (the
        UDP_GRO cmsg gives the segment size; every segment but the last has it). The
        segments are memoryviews of the one buffer the read returned: no copies."""
        data, anc, flags, addr = self.sock.recvmsg(MAX_DATAGRAM, _ANC_SIZE)
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            # cut short: a lost UDP_GRO cmsg would make a coalesced read look like one
            # datagram, a truncated one would end in a short packet; drop the read
            self.stats.rx_bad += 1
            return None
        dst = ""
        seg = 0
        for level, typ, cdata in anc:
            if level == socket.IPPROTO_IPV6 and typ == IPV6_PKTINFO and len(cdata) >= 16:
                dst = socket.inet_ntop(socket.AF_INET6, cdata[:16])
            elif level == socket.IPPROTO_IP and typ == IP_PKTINFO and len(cdata) >= 12:
                # struct in_pktinfo { int ifindex; in_addr spec_dst; in_addr addr; }
                dst = socket.inet_ntop(socket.AF_INET, cdata[8:12])
            elif level == _SOL_UDP and typ == _UDP_GRO and len(cdata) >= 4:
                seg = int.from_bytes(cdata[:4], _BYTEORDER)
        if not dst:
            dst = self._bound or ""
        src = str(addr[0]).split("%", 1)[0]
        port = int(addr[1])
        if 0 < seg < len(data):
            self.stats.rx_gro += 1
            return self._split(data, seg, src, dst, port)
        try:
            check_udp_payload(data)  # RFC 6773 §3.3: the DCCP header fits the UDP Length
        except DccpParseError:
            self.stats.rx_bad += 1
            return None
        return RxDatagram(src, dst, data, port)

    def _split(self, data: bytes, seg: int, src: str, dst: str,
               port: int) -> list[RxDatagram]:
        """The datagrams of a GRO read, in order; each checked as one (RFC 6773 §3.3)."""
        mv = memoryview(data)
        out: list[RxDatagram] = []
        for i in range(0, len(data), seg):
            d = mv[i:i + seg]
            try:
                check_udp_payload(d)
            except DccpParseError:
                self.stats.rx_bad += 1
                continue
            out.append(RxDatagram(src, dst, d, port))
        return out

    def sendto(self, data: bytes | memoryview, remote: str, udp_port: int = 0) -> bool:
        """Send the DCCP packet ``data`` (ports and all) to UDP port ``udp_port`` of
        ``remote``. Its DCCP Checksum field goes out as zero (RFC 6773 §3.3)."""
        if len(data) < 12:
            raise TransportError(errno.EINVAL, "not a DCCP packet")
        if not 0 < udp_port < 65536:
            raise TransportError(errno.EINVAL, f"DCCP-UDP needs the peer's UDP port ({udp_port})")
        if data[6] or data[7]:
            data = bytes(data[:6]) + b"\0\0" + bytes(data[8:])
        return self._send(data, (remote, udp_port))

    gso = True  # UDP_SEGMENT batches (issue 6); off once the kernel refuses one

    def sendto_many(self, datas: list[bytes], remote: str, udp_port: int = 0) -> int:
        """Send DCCP packets in order; each run of equal-length packets (the last of a run
        may be shorter, as UDP GSO allows) leaves with one ``sendmsg`` carrying
        ``UDP_SEGMENT``: the kernel cuts them apart again, the peer receives the same
        datagrams. One ``sendto`` each where GSO is refused (remembered) or a run is a
        single packet. Returns how many left."""
        if not self.gso or len(datas) < 2:
            return super().sendto_many(datas, remote, udp_port)
        if not 0 < udp_port < 65536:
            raise TransportError(errno.EINVAL, f"DCCP-UDP needs the peer's UDP port ({udp_port})")
        sent = 0
        i, n = 0, len(datas)
        while i < n:
            size = len(datas[i])
            j = i + 1
            total = size
            while (j < n and j - i < _GSO_MAX_SEGS and len(datas[j]) <= size
                   and total + len(datas[j]) <= _GSO_MAX_BYTES):
                total += len(datas[j])
                j += 1
                if len(datas[j - 1]) < size:
                    break  # a shorter one ends the run
            run = datas[i:j]
            if len(run) == 1 or any(d[6] or d[7] or len(d) < 12 for d in run):
                sent += sum(1 for d in run if self.sendto(d, remote, udp_port))
            else:
                sent += self._send_gso(run, size, (remote, udp_port))
            i = j
        return sent

    def send_packed(self, buf: memoryview, seg: int, remote: str, udp_port: int) -> int:
        """Send the DCCP packets packed back to back in ``buf``: each ``seg`` bytes, the
        last maybe shorter (a UDP GSO run, built by the endpoint's preallocated encoder).
        One ``sendmsg`` with ``UDP_SEGMENT`` (one ``sendto`` each where GSO is refused).
        Returns how many left."""
        if not 0 < udp_port < 65536:
            raise TransportError(errno.EINVAL, f"DCCP-UDP needs the peer's UDP port ({udp_port})")
        addr = (remote, udp_port)
        count = -(-len(buf) // seg)
        if count == 1 or not self.gso:
            return sum(1 for i in range(0, len(buf), seg) if self._send(buf[i:i + seg], addr))
        return self._send_gso([buf], seg, addr, count,
                              lambda: [buf[i:i + seg] for i in range(0, len(buf), seg)])

    def _send_gso(self, run: list[bytes] | list[memoryview], size: int, addr: tuple[str, int],
                  count: int = 0, one_by_one: Callable[[], list[memoryview]] | None = None
                  ) -> int:
        count = count or len(run)
        try:
            self.sock.sendmsg(run, [(_SOL_UDP, _UDP_SEGMENT, size.to_bytes(2, _BYTEORDER))],
                              0, addr)
        except (BlockingIOError, InterruptedError):
            self.stats.tx_drops += count
            return 0
        except OSError as e:
            if e.errno in (errno.ENOBUFS, errno.EAGAIN):
                self.stats.tx_drops += count
                return 0
            if e.errno in (errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT,
                           errno.EMSGSIZE):
                self.gso = False  # this kernel / route: one by one from now on
                parts = one_by_one() if one_by_one is not None else run
                return sum(1 for d in parts if self._send(d, addr))
            raise TransportError(e.errno, f"send to {addr[0]}: {e.strerror}") from e
        self.stats.tx += count
        self.stats.tx_gso += 1
        return count


def _enable_gro(s: socket.socket) -> bool:
    """Ask for coalesced receives (UDP_GRO, Linux 5.0); False where the kernel refuses:
    then every read is one datagram, as before."""
    try:
        s.setsockopt(_SOL_UDP, _UDP_GRO, 1)
    except OSError:
        return False
    return True


def _attach_filter(s: socket.socket, prog: tuple[tuple[int, int, int, int], ...]) -> bool:
    """Attach classic BPF ``prog`` to ``s`` (SO_ATTACH_FILTER); False if the kernel refuses."""
    code = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(code)
    fprog = struct.pack("HL", len(prog), ctypes.addressof(buf))
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)  # the kernel copies it
    except OSError:
        return False
    return True


def open_socket(kind: str, family: int, *, bind: str | None = None, port: int = 0,
                fwmark: int = 0, device: str | None = None) -> DccpSocket:
    """``kind`` is "raw" (IP protocol 33) or "udp" (DCCP-UDP on ``port``)."""
    if kind == "raw":
        return RawDccpSocket(family, bind=bind, fwmark=fwmark, device=device)
    if kind == "udp":
        return UdpDccpSocket(family, bind=bind, port=port, fwmark=fwmark, device=device)
    raise TransportError(errno.EINVAL, f"unknown DCCP transport {kind!r} (raw or udp)")
