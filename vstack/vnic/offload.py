"""TUN offloads (issue 6): ``IFF_VNET_HDR`` + ``TUNSETOFFLOAD``, and the sans-IO pieces the
offload datapath needs beyond :mod:`vstack.vnic.vnet`.

* :func:`enable_offloads` sets the virtio_net_hdr size (10) and asks for CSUM, TSO4/6 and
  USO4/6. USO arrived on TUN in Linux 6.2: where the kernel refuses a set (``EINVAL``), it
  tries the next smaller one (CSUM+TSO, CSUM, none) and says which it got.
* :func:`split_tcp`: user-space TCP segmentation of a ``GSO_TCPV4/6`` super-packet (the
  raw stack sends packets one by one: it cannot hand a 64 KiB TCP packet to a raw socket).
* :class:`GsoReply`: the per-flow header of a ``GSO_UDP_L4`` super-packet written *into*
  the TUN (the return path after ``UDP_GRO``): the header is built from a template, the
  payload is never copied (``writev``).

Sans-IO except :func:`enable_offloads` (one ioctl per try on a given fd).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import struct
from collections.abc import Sequence

from vstack.analysis.packet import checksum_add
from vstack.vnic import vnet
from vstack.vnic.tun import TUNSETOFFLOAD, TUNSETVNETHDRSZ

log = logging.getLogger("vstack.vnic.offload")

# linux/if_tun.h
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
ALL = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6
# what to try, best first (USO needs Linux >= 6.2 and CSUM; TSO needs CSUM)
LADDER = (ALL, TUN_F_CSUM | TUN_F_USO4 | TUN_F_USO6, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6,
          TUN_F_CSUM, 0)
_NAMES = ((TUN_F_CSUM, "csum"), (TUN_F_TSO4, "tso4"), (TUN_F_TSO6, "tso6"),
          (TUN_F_USO4, "uso4"), (TUN_F_USO6, "uso6"))


class OffloadError(RuntimeError):
    """The TUN cannot carry a virtio_net_hdr at all (the datapath falls back to plain)."""


def describe(flags: int) -> str:
    return ",".join(n for f, n in _NAMES if flags & f) or "none"


def enable_offloads(fd: int, want: int = ALL) -> int:
    """Set the vnet header size and the best offload set the kernel accepts, starting
    from ``want``. Returns the flags set (0: plain packets with a zero vnet header).
    Raises OffloadError if the fd was not opened with ``IFF_VNET_HDR``."""
    try:
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", vnet.VNET_HDR_LEN))
    except OSError as e:
        raise OffloadError(f"TUNSETVNETHDRSZ: {e.strerror}") from None
    refused: list[str] = []
    for flags in dict.fromkeys([want, *(f for f in LADDER if f & want == f)]):
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise OffloadError(f"TUNSETOFFLOAD: {e.strerror}") from None
            refused.append(describe(flags))
            continue
        if refused:
            log.warning("TUN offloads %s refused by this kernel (USO needs Linux >= 6.2); "
                        "using %s", " / ".join(refused), describe(flags))
        else:
            log.info("TUN offloads: %s", describe(flags))
        return flags
    return 0  # pragma: no cover  (0 is always accepted)


# ---------------------------------------------------------------------- TSO: split in user space
def split_tcp(pkt: bytes | bytearray | memoryview, hdr: vnet.VnetHdr) -> list[bytes]:
    """Segment a ``GSO_TCPV4/6`` super-packet into complete TCP/IP packets (RFC 9293
    sequence numbers advance by the bytes before each segment; FIN/PSH only on the last,
    CWR only on the first; IPv4 IDs increment), every checksum computed. A packet that is
    not GSO comes back whole with its checksum completed if it needed one."""
    b = bytes(pkt)
    if not b:
        raise vnet.VnetError("empty packet")
    version = b[0] >> 4
    if version == 4:
        ihl = (b[0] & 0x0F) * 4
        if ihl < 20 or len(b) < ihl + 20 or b[9] != 6:
            raise vnet.VnetError("TSO packet is not IPv4/TCP")
        src, dst = b[12:16], b[16:20]
    elif version == 6:
        ihl = 40
        if len(b) < 60 or b[6] != 6:
            raise vnet.VnetError("TSO packet is not IPv6/TCP (or has extension headers)")
        src, dst = b[8:24], b[24:40]
    else:
        raise vnet.VnetError(f"IP version {version}")
    thl = (b[ihl + 12] >> 4) * 4
    if thl < 20 or len(b) < ihl + thl:
        raise vnet.VnetError("bad TCP header length")
    body = memoryview(b)[ihl + thl:]
    size = hdr.gso_size if hdr.gso in (vnet.GSO_TCPV4, vnet.GSO_TCPV6) else 0
    if size <= 0 or len(body) <= size:
        chunks = [body]
    else:
        chunks = [body[i:i + size] for i in range(0, len(body), size)]
    ip = bytearray(b[:ihl])
    tcp = bytearray(b[ihl:ihl + thl])
    seq = int.from_bytes(tcp[4:8], "big")
    flags = tcp[13]
    ident = int.from_bytes(ip[4:6], "big") if version == 4 else 0
    base = checksum_add(dst, checksum_add(src, 6))
    out: list[bytes] = []
    off = 0
    last = len(chunks) - 1
    for i, chunk in enumerate(chunks):
        t = bytearray(tcp)
        t[4:8] = ((seq + off) & 0xFFFFFFFF).to_bytes(4, "big")
        f = flags
        if i != last:
            f &= ~0x09  # FIN, PSH
        if i != 0:
            f &= ~0x80  # CWR
        t[13] = f
        t[16:18] = b"\0\0"
        tlen = thl + len(chunk)
        ck = ~checksum_add(chunk, checksum_add(t, base + tlen)) & 0xFFFF
        t[16:18] = ck.to_bytes(2, "big")
        h = bytearray(ip)
        if version == 4:
            h[2:4] = (ihl + tlen).to_bytes(2, "big")
            h[4:6] = ((ident + i) & 0xFFFF).to_bytes(2, "big")
            h[10:12] = b"\0\0"
            h[10:12] = (~checksum_add(h) & 0xFFFF).to_bytes(2, "big")
        else:
            h[4:6] = tlen.to_bytes(2, "big")
        out.append(b"".join((h, t, chunk)))
        off += len(chunk)
    return out


def to_datagrams(pkt: bytes, hdr: vnet.VnetHdr) -> list[bytes]:
    """Any packet read from an offloading TUN -> plain packets with valid checksums, the
    way the per-datagram (slow) path wants them."""
    g = hdr.gso
    if g == vnet.GSO_UDP_L4:
        return vnet.split_udp(pkt, hdr)
    if g in (vnet.GSO_TCPV4, vnet.GSO_TCPV6):
        return split_tcp(pkt, hdr)
    if g != vnet.GSO_NONE:
        raise vnet.VnetError(f"unsupported gso_type {hdr.gso_type}")
    if hdr.needs_csum:
        buf = bytearray(pkt)
        vnet.complete_csum(buf, hdr)
        return [bytes(buf)]
    return [pkt]


# ---------------------------------------------------------------------- return path: GRO -> TUN
_V4 = struct.Struct("!BBHHHBBH4s4s")


class GsoReply:
    """Headers of ``GSO_UDP_L4`` super-packets from the flow's virtual destination back
    to the application: ``build(n_bytes, seg)`` -> ``vnet_hdr + IP + UDP`` header bytes to
    write in front of ``n_bytes`` of payload (``os.writev``; the kernel segments it into
    datagrams of ``seg`` bytes and finishes every checksum: ``NEEDS_CSUM`` with the
    pseudo-header sum in the UDP checksum field, as ``__udp_gso_segment`` expects)."""

    __slots__ = ("_fam", "_ip4", "_ports", "_sum", "_v6")

    def __init__(self, src: bytes, dst: bytes, sport: int, dport: int) -> None:
        self._fam = 4 if len(src) == 4 else 6
        self._sum = checksum_add(dst, checksum_add(src, 17))
        self._ports = struct.pack("!HH", sport, dport)
        if self._fam == 4:
            self._ip4 = (src, dst)
            self._v6 = b""
        else:
            self._ip4 = (b"", b"")
            # version 6, payload length (patched per packet), next header UDP, hop limit 64
            self._v6 = struct.pack("!IHBB", 6 << 28, 0, 17, 64) + src + dst

    @property
    def max_payload(self) -> int:
        return 0xFFFF - 28 if self._fam == 4 else 0xFFFF - 8

    def build(self, n: int, seg: int) -> bytes:
        ulen = 8 + n
        s = self._sum + ulen
        s = (s & 0xFFFF) + (s >> 16)
        if self._fam == 4:
            off = 20
            src, dst = self._ip4
            ip = bytearray(_V4.pack(0x45, 0, 20 + ulen, 0, 0, 64, 17, 0, src, dst))
            ip[10:12] = (~checksum_add(ip) & 0xFFFF).to_bytes(2, "big")
        else:
            off = 40
            ip = bytearray(self._v6)
            ip[4:6] = ulen.to_bytes(2, "big")
        if n > seg:
            vh = vnet._HDR.pack(vnet.F_NEEDS_CSUM, vnet.GSO_UDP_L4, off + 8, seg, off, 6)
        else:
            vh = vnet._HDR.pack(vnet.F_NEEDS_CSUM, vnet.GSO_NONE, 0, 0, off, 6)
        return b"".join((vh, ip, self._ports, ulen.to_bytes(2, "big"), s.to_bytes(2, "big")))


def segments(buf: bytes | memoryview, seg: int) -> Sequence[memoryview]:
    """The datagrams of a ``UDP_GRO`` receive (``seg`` bytes each, the last shorter)."""
    mv = memoryview(buf)
    if seg <= 0 or len(mv) <= seg:
        return [mv]
    return [mv[i:i + seg] for i in range(0, len(mv), seg)]
