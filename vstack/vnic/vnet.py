"""``virtio_net_hdr``: the offload header in front of every packet of a TUN opened with
``IFF_VNET_HDR`` (sans-IO: bytes in, bytes out).

With ``TUNSETOFFLOAD`` (CSUM, TSO4/6, USO4/6) the kernel hands vstack *super-packets*: one
IP header, one UDP header and up to 64 KiB of payload that stands for many datagrams of
``gso_size`` bytes each (``GSO_UDP_L4``), and packets whose transport checksum is only
partly filled in (``NEEDS_CSUM``). In the other direction vstack may write one super-packet
that the kernel segments on the way to the application.

Layout (``struct virtio_net_hdr``, virtio spec 1.1 §5.1.6, native byte order on a TUN that
has not been switched with TUNSETVNETBE/LE; 10 bytes)::

    u8 flags; u8 gso_type; u16 hdr_len; u16 gso_size; u16 csum_start; u16 csum_offset

``hdr_len`` is advisory and not trusted: :func:`split_udp` recomputes the header length
from the packet itself.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass

from vstack.analysis.packet import ParseError, checksum_add

VNET_HDR_LEN = 10

F_NEEDS_CSUM = 1
F_DATA_VALID = 2

GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3  # UFO, long gone from Linux
GSO_TCPV6 = 4
GSO_UDP_L4 = 5  # USO, Linux >= 6.2 on TUN
GSO_ECN = 0x80

_ORDER = "<" if sys.byteorder == "little" else ">"
_HDR = struct.Struct(_ORDER + "BBHHHH")
NO_OFFLOAD = _HDR.pack(0, GSO_NONE, 0, 0, 0, 0)


class VnetError(ParseError):
    """A virtio_net_hdr or super-packet that cannot be handled (counted and dropped)."""


@dataclass(frozen=True, slots=True)
class VnetHdr:
    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    @property
    def needs_csum(self) -> bool:
        return bool(self.flags & F_NEEDS_CSUM)

    @property
    def gso(self) -> int:
        return self.gso_type & ~GSO_ECN

    def pack(self) -> bytes:
        return _HDR.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size,
                         self.csum_start, self.csum_offset)


def parse_hdr(buf: bytes | bytearray | memoryview) -> VnetHdr:
    if len(buf) < VNET_HDR_LEN:
        raise VnetError(f"virtio_net_hdr truncated ({len(buf)} bytes)")
    return VnetHdr(*_HDR.unpack_from(buf, 0))


def _l4_offset(pkt: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(version, offset of the UDP header) of a UDP packet; ParseError otherwise.
    IPv6 extension headers are not expected on offloaded packets and are refused."""
    if len(pkt) < 20:
        raise VnetError("packet too short for an IP header")
    version = pkt[0] >> 4
    if version == 4:
        ihl = (pkt[0] & 0x0F) * 4
        if ihl < 20 or pkt[9] != 17:
            raise VnetError("offloaded IPv4 packet is not UDP")
        return 4, ihl
    if version == 6:
        if len(pkt) < 40 or pkt[6] != 17:
            raise VnetError("offloaded IPv6 packet is not UDP (or has extension headers)")
        return 6, 40
    raise VnetError(f"IP version {version}")


def complete_csum(pkt: bytearray, hdr: VnetHdr) -> None:
    """Finish a ``NEEDS_CSUM`` packet in place: the field at ``csum_start + csum_offset``
    holds the pseudo-header sum; the checksum covers ``csum_start`` to the end."""
    if not hdr.needs_csum:
        return
    start, field = hdr.csum_start, hdr.csum_start + hdr.csum_offset
    if field + 2 > len(pkt) or start >= len(pkt):
        raise VnetError("csum_start/csum_offset outside the packet")
    ck = ~checksum_add(memoryview(pkt)[start:]) & 0xFFFF
    if ck == 0 and pkt[_proto_byte(pkt)] == 17:
        ck = 0xFFFF  # RFC 768: a computed zero UDP checksum is sent as all ones
    pkt[field:field + 2] = ck.to_bytes(2, "big")


def _proto_byte(pkt: bytes | bytearray | memoryview) -> int:
    return 9 if pkt[0] >> 4 == 4 else 6


def udp_payloads(pkt: bytes | bytearray | memoryview, hdr: VnetHdr) -> list[memoryview]:
    """The datagram payloads a UDP packet from the TUN stands for, in order, without
    copying: one for a plain packet, ``ceil(len / gso_size)`` for a ``GSO_UDP_L4``
    super-packet (the last may be shorter). This is all the UDP stack needs: it sends the
    payloads on with its own socket (one ``sendmsg`` with ``UDP_SEGMENT``)."""
    _version, off = _l4_offset(pkt)
    mv = memoryview(pkt)
    body = mv[off + 8:]
    if hdr.gso not in (GSO_UDP_L4,) or hdr.gso_size == 0 or len(body) <= hdr.gso_size:
        if hdr.gso not in (GSO_NONE, GSO_UDP_L4):
            raise VnetError(f"unsupported gso_type {hdr.gso_type}")
        return [body]
    size = hdr.gso_size
    return [body[i:i + size] for i in range(0, len(body), size)]


def split_udp(pkt: bytes | bytearray | memoryview, hdr: VnetHdr) -> list[bytes]:
    """Segment a ``GSO_UDP_L4`` super-packet into complete IP/UDP datagrams with their own
    lengths, IPv4 IDs and checksums (for stacks and paths that need datagrams one by one).
    A plain packet comes back as one datagram, its checksum completed if needed."""
    version, off = _l4_offset(pkt)
    payloads = udp_payloads(pkt, hdr)
    ip = bytes(pkt[:off])
    ports = bytes(pkt[off:off + 4])
    if version == 4:
        src, dst = ip[12:16], ip[16:20]
        ident = int.from_bytes(ip[4:6], "big")
    else:
        src, dst = ip[8:24], ip[24:40]
        ident = 0
    base = checksum_add(dst, checksum_add(src, 17 + int.from_bytes(ports[:2], "big")
                                          + int.from_bytes(ports[2:], "big")))
    out: list[bytes] = []
    for i, payload in enumerate(payloads):
        ulen = 8 + len(payload)
        ck = ~checksum_add(payload, base + ulen + ulen) & 0xFFFF or 0xFFFF
        udp = ports + ulen.to_bytes(2, "big") + ck.to_bytes(2, "big")
        if version == 4:
            h = bytearray(ip)
            h[2:4] = (off + ulen).to_bytes(2, "big")
            h[4:6] = ((ident + i) & 0xFFFF).to_bytes(2, "big")
            h[10:12] = b"\x00\x00"
            h[10:12] = (~checksum_add(h) & 0xFFFF).to_bytes(2, "big")
        else:
            h = bytearray(ip)
            h[4:6] = ulen.to_bytes(2, "big")
        out.append(b"".join((h, udp, payload)))
    return out


def coalesce_udp(header_pkt: bytes, payloads: list[bytes]) -> tuple[bytes, bytes]:
    """Build one ``GSO_UDP_L4`` super-packet for writing into the TUN: ``header_pkt`` is
    a complete IP/UDP packet of the flow (its addresses and ports are used), ``payloads``
    are equal-sized datagram payloads (the last may be shorter). Returns
    ``(vnet_hdr, packet)``; the kernel segments it and finishes the checksums."""
    if not payloads:
        raise ValueError("nothing to coalesce")
    version, off = _l4_offset(header_pkt)
    size = len(payloads[0])
    if any(len(p) > size for p in payloads[1:]) or any(len(p) != size for p in payloads[1:-1]):
        raise ValueError("GSO needs equal-sized segments (the last may be shorter)")
    body = b"".join(payloads)
    ulen = 8 + len(body)
    if off + ulen > 0xFFFF:
        raise ValueError(f"super-packet too long ({off + ulen} bytes)")
    h = bytearray(header_pkt[:off])
    if version == 4:
        h[2:4] = (off + ulen).to_bytes(2, "big")
        h[10:12] = b"\x00\x00"
        h[10:12] = (~checksum_add(h) & 0xFFFF).to_bytes(2, "big")
        src, dst = h[12:16], h[16:20]
    else:
        h[4:6] = ulen.to_bytes(2, "big")
        src, dst = h[8:24], h[24:40]
    # CHECKSUM_PARTIAL: the field holds the (uncomplemented) pseudo-header sum; the kernel
    # adjusts it per segment (net/ipv4/udp_offload.c, __udp_gso_segment).
    pseudo = checksum_add(dst, checksum_add(src, 17 + ulen))
    udp = header_pkt[off:off + 4] + ulen.to_bytes(2, "big") + pseudo.to_bytes(2, "big")
    if len(payloads) == 1:
        vh = VnetHdr(F_NEEDS_CSUM, GSO_NONE, 0, 0, off, 6)
    else:
        vh = VnetHdr(F_NEEDS_CSUM, GSO_UDP_L4, off + 8, size, off, 6)
    return vh.pack(), b"".join((h, udp, body))
