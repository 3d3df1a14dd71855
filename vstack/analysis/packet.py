"""IP packet codec (sans-IO): parse IPv4/IPv6 + UDP/TCP/ICMP/ICMPv6, build test and reply packets.

Parsing
    ``parse(buf) -> IPPacket`` accepts a raw IP packet (as read from a TUN device, no link
    header).  Every input either parses or raises :class:`ParseError` (a ``ValueError``)
    with a reason; nothing else escapes (no ``IndexError``, no ``struct.error``).

    * IPv4 (RFC 791): header options are skipped; the header checksum is *not* checked by
      ``parse`` (see :func:`verify_ip_checksum`).  A non-first fragment (offset != 0) has no
      transport header: ``l4`` is ``None``.  A first fragment (MF set) gets its transport
      header parsed when it is all there, but its UDP length is not checked against the
      fragment (it refers to the reassembled datagram).
    * IPv6 (RFC 8200 s4): the extension-header chain is walked: hop-by-hop (0), routing
      (43), fragment (44), destination options (60), mobility (135), HIP (139), shim6 (140)
      and AH (51, RFC 4302 s2.2: length in 4-octet units).  The walk stops at ESP (50) and
      no-next-header (59), where ``l4`` is ``None``.  ``proto`` is the upper-layer protocol,
      ``header_len`` the IPv6 header plus all extension headers.  Jumbograms (payload
      length 0) are rejected.
    * Lengths are verified: the IP total length must fit the buffer (bytes past it, e.g.
      link padding, are ignored), the UDP length must lie between 8 and the IP payload, a
      TCP data offset between 5 and the segment.
    * Addresses are strings in Python's ``ipaddress`` canonical form (so they compare equal
      to ``str(ipaddress.ip_address(...))`` and to :class:`FlowKey` text).

Building
    ``build_udp``, ``build_tcp``, ``build_icmp_echo`` (IPv4 or IPv6 chosen by address
    family, all checksums filled in), the lower-level ``build_ipv4`` / ``build_ipv6``, and
    :class:`UDPTemplate` for the datapath's reply path (pre-computed header and pseudo-header
    sum per flow; one checksum pass per packet).

Checksums (RFC 1071)
    ``internet_checksum`` uses the fact that 2**16 = 1 (mod 0xFFFF): the ones'-complement
    sum of the 16-bit words equals ``int.from_bytes(data) % 0xFFFF`` (with 0 mapped to
    0xFFFF for non-zero data), so one C-level conversion replaces a per-word loop.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

_T = TypeVar("_T")

__all__ = [
    "ICMP",
    "ICMPV6",
    "TCP",
    "UDP",
    "UDPLITE",
    "ICMPHeader",
    "IPPacket",
    "ParseError",
    "TCPHeader",
    "UDPHeader",
    "UDPTemplate",
    "build_icmp_echo",
    "build_ipv4",
    "build_ipv6",
    "build_tcp",
    "build_udp",
    "checksum_add",
    "fast_constructor",
    "internet_checksum",
    "ip_family",
    "parse",
    "pseudo_header",
    "pseudo_header_sum",
    "tcp_flags_str",
    "tcp_flags_value",
    "verify_ip_checksum",
    "verify_l4_checksum",
]

ICMP: Final = 1
TCP: Final = 6
UDP: Final = 17
DCCP: Final = 33
ESP: Final = 50
AH: Final = 51
ICMPV6: Final = 58
NO_NEXT_HEADER: Final = 59
UDPLITE: Final = 136

# IPv6 extension headers whose length field counts 8-octet units beyond the first 8 octets
# (RFC 8200 s4.3-4.6; mobility RFC 6275, HIP RFC 7401, shim6 RFC 5533).
_EXT_8: Final = frozenset({0, 43, 60, 135, 139, 140})
_FRAGMENT_HDR: Final = 44

ICMP_ECHO_REQUEST: Final = 8
ICMP_ECHO_REPLY: Final = 0
ICMPV6_ECHO_REQUEST: Final = 128
ICMPV6_ECHO_REPLY: Final = 129
_ECHO_TYPES: Final = {ICMP: (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY),
                      ICMPV6: (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY)}

# TCP flag letters, lowest bit first (RFC 9293 s3.1; ECE/CWR RFC 3168).
_TCP_FLAG_LETTERS: Final = "FSRPAUEC"


class ParseError(ValueError):
    """The packet is malformed or not an IP packet we can read.  ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class UDPHeader:
    """UDP (RFC 768) or UDP-Lite (RFC 3828; ``length`` is then the checksum coverage)."""

    sport: int
    dport: int
    length: int
    checksum: int


@dataclass(frozen=True, slots=True)
class TCPHeader:
    """TCP (RFC 9293 s3.1).  ``header_len`` is the data offset in bytes."""

    sport: int
    dport: int
    seq: int
    ack: int
    header_len: int
    flags: int
    window: int
    checksum: int
    urgent: int

    @property
    def flags_str(self) -> str:
        return tcp_flags_str(self.flags)


@dataclass(frozen=True, slots=True)
class ICMPHeader:
    """ICMP (RFC 792) or ICMPv6 (RFC 4443).  ``ident``/``seq`` are set for echo messages."""

    type: int
    code: int
    checksum: int
    ident: int | None = None
    seq: int | None = None

    @property
    def is_echo(self) -> bool:
        return self.ident is not None


L4Header = UDPHeader | TCPHeader | ICMPHeader


@dataclass(frozen=True, slots=True)
class IPPacket:
    """One parsed IP packet.

    ``total_len`` is the IP length (header + payload, ignoring trailing bytes in the buffer);
    ``header_len`` is the IP header including IPv4 options / IPv6 extension headers;
    ``l4_offset`` is where the transport header starts; ``payload_offset``/``payload_len``
    locate the transport payload (for ``l4 is None`` the bytes after the IP headers).
    ``fragment`` is true for any fragment (MF set or offset != 0); ``frag_offset`` is in bytes.
    """

    version: int
    src: str
    dst: str
    proto: int
    dscp: int
    ecn: int
    ttl: int
    total_len: int
    header_len: int
    l4: UDPHeader | TCPHeader | ICMPHeader | None
    payload_offset: int
    payload_len: int
    fragment: bool
    frag_offset: int = 0
    more_fragments: bool = False
    ident: int = 0  # IPv4 identification / IPv6 fragment identification
    flow_label: int = 0

    @property
    def l4_offset(self) -> int:
        return self.header_len

    @property
    def family(self) -> int:
        return self.version

    @property
    def sport(self) -> int:
        l4 = self.l4
        if isinstance(l4, UDPHeader | TCPHeader):
            return l4.sport
        if isinstance(l4, ICMPHeader) and l4.ident is not None:
            return l4.ident
        return 0

    @property
    def dport(self) -> int:
        l4 = self.l4
        if isinstance(l4, UDPHeader | TCPHeader):
            return l4.dport
        return 0

    def payload(self, buf: bytes | bytearray | memoryview) -> bytes:
        """The transport payload of ``buf`` (the buffer this packet was parsed from)."""
        return bytes(buf[self.payload_offset:self.payload_offset + self.payload_len])


# --------------------------------------------------------------------------- helpers

def fast_constructor(cls: type[_T]) -> Callable[..., _T]:
    """A positional-only constructor for a frozen, slotted dataclass that stores the fields
    through the slot descriptors, skipping the generated ``__init__`` (which goes through
    ``object.__setattr__`` per field and is about twice as slow).  Every field must be given,
    in declaration order; the instance is the same (frozen, equal, hashable) as ``cls(...)``.
    """
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    ns: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    body = []
    for i, n in enumerate(names):
        ns[f"_s{i}"] = getattr(cls, n).__set__
        body.append(f"    _s{i}(o, a{i})\n")
    src = (f"def make({', '.join(f'a{i}' for i in range(len(names)))}):\n"
           "    o = _new(_cls)\n" + "".join(body) + "    return o\n")
    exec(src, ns)  # generated from the dataclass's own field list only
    make: Callable[..., _T] = ns["make"]
    make.__name__ = f"new_{cls.__name__}"
    return make


_new_udp = fast_constructor(UDPHeader)
_new_tcp = fast_constructor(TCPHeader)
_new_icmp = fast_constructor(ICMPHeader)
_new_ip = fast_constructor(IPPacket)


_FLAG_STRS: Final = tuple("".join(c for i, c in enumerate(_TCP_FLAG_LETTERS) if f >> i & 1)
                          for f in range(256))


def tcp_flags_str(flags: int) -> str:
    """``0x12`` -> ``"SA"``: letters F S R P A U E C, lowest bit first."""
    return _FLAG_STRS[flags & 0xFF]


def tcp_flags_value(flags: str | int) -> int:
    """Inverse of :func:`tcp_flags_str`; ints pass through (checked to fit 8 bits)."""
    if isinstance(flags, int):
        if not 0 <= flags <= 0xFF:
            raise ValueError(f"TCP flags out of range: {flags}")
        return flags
    v = 0
    for c in flags.upper():
        i = _TCP_FLAG_LETTERS.find(c)
        if i < 0:
            raise ValueError(f"unknown TCP flag {c!r} in {flags!r} (use {_TCP_FLAG_LETTERS})")
        v |= 1 << i
    return v


_ntop = socket.inet_ntop
_AF4 = socket.AF_INET
_AF6 = socket.AF_INET6


def _v6str(b: bytes | bytearray | memoryview) -> str:
    s = _ntop(_AF6, b)
    if "." in s:  # glibc prints ::a.b.c.d / ::ffff:a.b.c.d; use ipaddress's canonical form
        s = str(ipaddress.IPv6Address(bytes(b)))
    return s


def ip_family(addr: str) -> int:
    """4 or 6 for an address string (raises ValueError if it is neither)."""
    return ipaddress.ip_address(addr).version


def _pack_addr(addr: str) -> tuple[int, bytes]:
    try:
        if ":" in addr:
            return 6, socket.inet_pton(_AF6, addr)
        return 4, socket.inet_pton(_AF4, addr)
    except OSError:
        raise ValueError(f"not an IP address: {addr!r}") from None


def _pack_pair(src: str, dst: str) -> tuple[int, bytes, bytes]:
    fs, s = _pack_addr(src)
    fd, d = _pack_addr(dst)
    if fs != fd:
        raise ValueError(f"address families differ: {src} -> {dst}")
    return fs, s, d


# --------------------------------------------------------------------------- checksums

def checksum_add(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """Ones'-complement sum (folded to 16 bits, 0..0xFFFF) of ``data`` plus ``initial``.

    Odd-length data is padded with a zero byte (RFC 1071).  Sums of several pieces may be
    combined with ``checksum_add(piece, previous)`` as long as every piece but the last has
    even length.
    """
    n = len(data)
    v = int.from_bytes(data, "big")
    if n & 1:
        v <<= 8
    v += initial
    if not v:
        return 0
    v %= 0xFFFF
    return v or 0xFFFF


def internet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """RFC 1071 Internet checksum of ``data`` (``initial``: a partial sum, e.g. a pseudo header).

    Computing it over data that contains a correct checksum gives 0.
    """
    return ~checksum_add(data, initial) & 0xFFFF


def pseudo_header(src: str, dst: str, proto: int, length: int) -> bytes:
    """The pseudo header for the transport checksum: RFC 768 / RFC 9293 s3.1 for IPv4
    (src, dst, zero, proto, 16-bit length), RFC 8200 s8.1 for IPv6 (src, dst, 32-bit
    length, three zero bytes, next header)."""
    fam, s, d = _pack_pair(src, dst)
    if fam == 4:
        return s + d + struct.pack("!BBH", 0, proto, length)
    return s + d + struct.pack("!IxxxB", length, proto)


def pseudo_header_sum(src: str, dst: str, proto: int, length: int) -> int:
    """``checksum_add(pseudo_header(...))``."""
    return checksum_add(pseudo_header(src, dst, proto, length))


def _pseudo_sum_raw(src: bytes | memoryview, dst: bytes | memoryview, proto: int,
                    length: int) -> int:
    # src and dst have even length, so the pieces combine (see checksum_add).
    return checksum_add(dst, checksum_add(src, proto + length))


# --------------------------------------------------------------------------- parsing

def parse(buf: bytes | bytearray | memoryview) -> IPPacket:
    """Parse one raw IP packet.  Raises :class:`ParseError` for anything malformed."""
    n = len(buf)
    if n < 1:
        raise ParseError("empty packet")
    version = buf[0] >> 4
    if version == 4:
        return _parse_v4(buf, n)
    if version == 6:
        return _parse_v6(buf, n)
    raise ParseError(f"IP version {version} (not 4 or 6)")


def _parse_v4(buf: bytes | bytearray | memoryview, n: int) -> IPPacket:
    # RFC 791 s3.1
    if n < 20:
        raise ParseError(f"IPv4 header truncated ({n} < 20 bytes)")
    ihl = (buf[0] & 0x0F) * 4
    if ihl < 20:
        raise ParseError(f"IPv4 header length {ihl} < 20")
    total = buf[2] << 8 | buf[3]
    if total < ihl:
        raise ParseError(f"IPv4 total length {total} < header length {ihl}")
    if total > n:
        raise ParseError(f"IPv4 total length {total} > buffer {n}")
    tos = buf[1]
    ident = buf[4] << 8 | buf[5]
    ff = buf[6] << 8 | buf[7]
    mf = bool(ff & 0x2000)
    frag_off = (ff & 0x1FFF) * 8
    proto = buf[9]
    src = _ntop(_AF4, bytes(buf[12:16]))
    dst = _ntop(_AF4, bytes(buf[16:20]))
    fragment = mf or frag_off != 0
    if frag_off:
        l4 = None
        poff, plen = ihl, total - ihl
    else:
        l4, poff, plen = _parse_l4(buf, proto, ihl, total, fragment)
    return _new_ip(4, src, dst, proto, tos >> 2, tos & 3, buf[8], total, ihl, l4, poff, plen,
                    fragment, frag_off, mf, ident, 0)


def _parse_v6(buf: bytes | bytearray | memoryview, n: int) -> IPPacket:
    # RFC 8200 s3
    if n < 40:
        raise ParseError(f"IPv6 header truncated ({n} < 40 bytes)")
    plen6 = buf[4] << 8 | buf[5]
    if plen6 == 0:
        raise ParseError("IPv6 payload length 0 (jumbograms are not supported)")
    total = 40 + plen6
    if total > n:
        raise ParseError(f"IPv6 length {total} > buffer {n}")
    tc = (buf[0] & 0x0F) << 4 | buf[1] >> 4
    flow_label = (buf[1] & 0x0F) << 16 | buf[2] << 8 | buf[3]
    nh = buf[6]
    hop = buf[7]
    src = _v6str(bytes(buf[8:24]))
    dst = _v6str(bytes(buf[24:40]))
    off = 40
    fragment = mf = False
    frag_off = ident = 0
    seen_frag = False
    while True:
        if nh in _EXT_8:
            if off + 8 > total:
                raise ParseError(f"IPv6 extension header {nh} truncated at {off}")
            if nh == 0 and off != 40:
                raise ParseError("IPv6 hop-by-hop header not first (RFC 8200 s4.3)")
            nxt = buf[off]
            off += (buf[off + 1] + 1) * 8
            nh = nxt
        elif nh == AH:  # RFC 4302 s2.2
            if off + 8 > total:
                raise ParseError(f"IPv6 AH truncated at {off}")
            nxt = buf[off]
            off += (buf[off + 1] + 2) * 4
            nh = nxt
        elif nh == _FRAGMENT_HDR:  # RFC 8200 s4.5
            if off + 8 > total:
                raise ParseError(f"IPv6 fragment header truncated at {off}")
            if seen_frag:
                raise ParseError("IPv6 packet has two fragment headers")
            seen_frag = True
            nxt = buf[off]
            fo = buf[off + 2] << 8 | buf[off + 3]
            frag_off = fo & 0xFFF8
            mf = bool(fo & 1)
            ident = int.from_bytes(buf[off + 4:off + 8], "big")
            fragment = mf or frag_off != 0
            off += 8
            nh = nxt
        else:
            break
        if off > total:
            raise ParseError(f"IPv6 extension header runs past the packet ({off} > {total})")
    ds = tc >> 2
    ecn = tc & 3
    if frag_off or nh in (ESP, NO_NEXT_HEADER):
        l4 = None
        poff, plen = off, total - off
    else:
        l4, poff, plen = _parse_l4(buf, nh, off, total, fragment)
    return _new_ip(6, src, dst, nh, ds, ecn, hop, total, off, l4, poff, plen, fragment,
                    frag_off, mf, ident, flow_label)


def _parse_l4(buf: bytes | bytearray | memoryview, proto: int, off: int, total: int,
              fragment: bool) -> tuple[L4Header | None, int, int]:
    avail = total - off
    if proto in (UDP, UDPLITE):
        if avail < 8:
            if fragment:
                return None, off, avail
            raise ParseError(f"UDP header truncated ({avail} < 8 bytes)")
        ulen = buf[off + 4] << 8 | buf[off + 5]
        h = _new_udp(buf[off] << 8 | buf[off + 1], buf[off + 2] << 8 | buf[off + 3], ulen,
                      buf[off + 6] << 8 | buf[off + 7])
        if proto == UDPLITE:
            # RFC 3828 s3.1: coverage 0 = whole datagram, else 8..length
            if ulen != 0 and (ulen < 8 or ulen > avail):
                raise ParseError(f"UDP-Lite checksum coverage {ulen} invalid (datagram {avail})")
            return h, off + 8, avail - 8
        if fragment:
            return h, off + 8, avail - 8
        if ulen < 8:
            raise ParseError(f"UDP length {ulen} < 8")
        if ulen > avail:
            raise ParseError(f"UDP length {ulen} > IP payload {avail}")
        return h, off + 8, ulen - 8
    if proto == TCP:
        if avail < 20:
            if fragment:
                return None, off, avail
            raise ParseError(f"TCP header truncated ({avail} < 20 bytes)")
        hl = (buf[off + 12] >> 4) * 4
        if hl < 20:
            raise ParseError(f"TCP data offset {hl} < 20")
        if hl > avail:
            if fragment:
                return None, off, avail
            raise ParseError(f"TCP data offset {hl} > segment {avail}")
        sport, dport, seq, ack, _do, flags, win, ck, urg = struct.unpack_from(
            "!HHIIBBHHH", buf, off)
        return _new_tcp(sport, dport, seq, ack, hl, flags, win, ck, urg), off + hl, avail - hl
    if proto in (ICMP, ICMPV6):
        if avail < 8:
            if fragment:
                return None, off, avail
            raise ParseError(f"ICMP header truncated ({avail} < 8 bytes)")
        t = buf[off]
        code = buf[off + 1]
        ck = buf[off + 2] << 8 | buf[off + 3]
        if t in _ECHO_TYPES[proto]:
            ih = _new_icmp(t, code, ck, buf[off + 4] << 8 | buf[off + 5],
                            buf[off + 6] << 8 | buf[off + 7])
        else:
            ih = _new_icmp(t, code, ck, None, None)
        return ih, off + 8, avail - 8
    return None, off, avail


def verify_ip_checksum(buf: bytes | bytearray | memoryview) -> bool:
    """True if ``buf`` is IPv6 (no header checksum) or an IPv4 header with a correct checksum."""
    p = parse(buf)
    if p.version == 6:
        return True
    return checksum_add(buf[:p.header_len]) == 0xFFFF


def verify_l4_checksum(buf: bytes | bytearray | memoryview) -> bool:
    """Check the UDP / UDP-Lite / TCP / ICMP / ICMPv6 checksum of a whole (unfragmented) packet.

    An IPv4 UDP checksum of 0 means "not computed" (RFC 768) and counts as valid.  The
    pseudo header uses the IPv6 header's destination (a routing header with segments left
    is not followed to the final destination, RFC 8200 s8.1).  Raises
    :class:`ParseError` if the packet does not parse, is a fragment, or has no such header.
    """
    p = parse(buf)
    if p.fragment:
        raise ParseError("cannot verify the transport checksum of a fragment")
    if p.l4 is None:
        raise ParseError(f"protocol {p.proto} has no checksum that we verify")
    off = p.header_len
    if p.proto == UDP:
        assert isinstance(p.l4, UDPHeader)
        end = off + p.l4.length
        if p.version == 4 and p.l4.checksum == 0:
            return True
    else:
        end = p.total_len
        if p.proto == UDPLITE:
            assert isinstance(p.l4, UDPHeader)
            if p.l4.length:
                cov_end = off + p.l4.length
                mv = memoryview(buf)
                s, d = _raw_addrs(mv, p.version)
                return checksum_add(mv[off:cov_end], _pseudo_sum_raw(
                    s, d, UDPLITE, end - off)) == 0xFFFF
    mv = memoryview(buf)
    seg = mv[off:end]
    if p.proto == ICMP:
        return checksum_add(seg) == 0xFFFF
    s, d = _raw_addrs(mv, p.version)
    return checksum_add(seg, _pseudo_sum_raw(s, d, p.proto, end - off)) == 0xFFFF


def _raw_addrs(mv: memoryview, version: int) -> tuple[memoryview, memoryview]:
    if version == 4:
        return mv[12:16], mv[16:20]
    return mv[8:24], mv[24:40]


# --------------------------------------------------------------------------- building

def build_ipv4(src: str | bytes, dst: str | bytes, proto: int, payload: bytes, *, dscp: int = 0,
               ecn: int = 0, ttl: int = 64, ident: int = 0, df: bool = False,
               mf: bool = False, frag_offset: int = 0, options: bytes = b"") -> bytes:
    """An IPv4 packet (RFC 791) around ``payload`` with a correct header checksum.
    ``frag_offset`` is in bytes (multiple of 8); ``options`` is padded to 4 bytes."""
    s = _pack_addr(src)[1] if isinstance(src, str) else src
    d = _pack_addr(dst)[1] if isinstance(dst, str) else dst
    if len(s) != 4 or len(d) != 4:
        raise ValueError("IPv4 addresses must be 4 bytes")
    if frag_offset % 8 or not 0 <= frag_offset <= 0x1FFF * 8:
        raise ValueError(f"bad fragment offset {frag_offset}")
    if len(options) % 4:
        options += b"\x00" * (4 - len(options) % 4)
    ihl = 20 + len(options)
    if ihl > 60:
        raise ValueError("IPv4 options longer than 40 bytes")
    total = ihl + len(payload)
    if total > 0xFFFF:
        raise ValueError(f"IPv4 packet too long ({total} bytes)")
    ff = (0x4000 if df else 0) | (0x2000 if mf else 0) | frag_offset // 8
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl // 4, (dscp & 0x3F) << 2 | (ecn & 3),
                                total, ident & 0xFFFF, ff, ttl, proto, 0, s, d))
    hdr += options
    struct.pack_into("!H", hdr, 10, internet_checksum(hdr))
    return bytes(hdr) + payload


def build_ipv6(src: str | bytes, dst: str | bytes, next_header: int, payload: bytes, *,
               dscp: int = 0, ecn: int = 0, hop_limit: int = 64, flow_label: int = 0) -> bytes:
    """An IPv6 packet (RFC 8200 s3); ``payload`` may start with extension headers."""
    s = _pack_addr(src)[1] if isinstance(src, str) else src
    d = _pack_addr(dst)[1] if isinstance(dst, str) else dst
    if len(s) != 16 or len(d) != 16:
        raise ValueError("IPv6 addresses must be 16 bytes")
    if not 0 < len(payload) <= 0xFFFF:
        raise ValueError(f"IPv6 payload length {len(payload)} not in 1..65535")
    tc = (dscp & 0x3F) << 2 | (ecn & 3)
    first = 6 << 28 | tc << 20 | (flow_label & 0xFFFFF)
    return struct.pack("!IHBB16s16s", first, len(payload), next_header, hop_limit, s, d) + payload


def _wrap(fam: int, s: bytes, d: bytes, proto: int, seg: bytes, dscp: int, ecn: int,
          ttl: int, ident: int) -> bytes:
    if fam == 4:
        return build_ipv4(s, d, proto, seg, dscp=dscp, ecn=ecn, ttl=ttl, ident=ident)
    return build_ipv6(s, d, proto, seg, dscp=dscp, ecn=ecn, hop_limit=ttl)


def _check_port(p: int, name: str) -> None:
    if not 0 <= p <= 0xFFFF:
        raise ValueError(f"{name} {p} out of range 0..65535")


def build_udp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"", *,
              dscp: int = 0, ttl: int = 64, ecn: int = 0, ident: int = 0) -> bytes:
    """An IPv4 or IPv6 (by address family) UDP datagram with correct IP and UDP checksums."""
    fam, s, d = _pack_pair(src, dst)
    _check_port(sport, "sport")
    _check_port(dport, "dport")
    ulen = 8 + len(payload)
    if ulen > 0xFFFF:
        raise ValueError(f"UDP datagram too long ({ulen} bytes)")
    hdr = struct.pack("!HHHH", sport, dport, ulen, 0)
    ck = internet_checksum(payload, checksum_add(hdr, _pseudo_sum_raw(s, d, UDP, ulen)))
    seg = struct.pack("!HHHH", sport, dport, ulen, ck or 0xFFFF) + payload
    return _wrap(fam, s, d, UDP, seg, dscp, ecn, ttl, ident)


def build_tcp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"", *,
              seq: int = 0, ack: int = 0, flags: str | int = "S", window: int = 65535,
              urgent: int = 0, options: bytes = b"", dscp: int = 0, ttl: int = 64,
              ecn: int = 0, ident: int = 0) -> bytes:
    """An IPv4 or IPv6 TCP segment with correct checksums.  ``flags``: ``"SA"`` or an int;
    ``options`` is padded to 4 bytes with zeros (end of option list)."""
    fam, s, d = _pack_pair(src, dst)
    _check_port(sport, "sport")
    _check_port(dport, "dport")
    fl = tcp_flags_value(flags)
    if len(options) % 4:
        options += b"\x00" * (4 - len(options) % 4)
    hl = 20 + len(options)
    if hl > 60:
        raise ValueError("TCP options longer than 40 bytes")
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                      (hl // 4) << 4, fl, window & 0xFFFF, 0, urgent & 0xFFFF) + options
    seglen = hl + len(payload)
    ck = internet_checksum(payload, checksum_add(hdr, _pseudo_sum_raw(s, d, TCP, seglen)))
    seg = hdr[:16] + ck.to_bytes(2, "big") + hdr[18:] + payload
    return _wrap(fam, s, d, TCP, seg, dscp, ecn, ttl, ident)


def build_icmp_echo(src: str, dst: str, ident: int, seq: int, payload: bytes = b"", *,
                    reply: bool = False, dscp: int = 0, ttl: int = 64) -> bytes:
    """ICMP (IPv4) or ICMPv6 echo request (or reply) with correct checksums."""
    fam, s, d = _pack_pair(src, dst)
    _check_port(ident, "ident")
    _check_port(seq, "seq")
    if fam == 4:
        t = ICMP_ECHO_REPLY if reply else ICMP_ECHO_REQUEST
        body = struct.pack("!BBHHH", t, 0, 0, ident, seq) + payload
        ck = internet_checksum(body)
        proto = ICMP
    else:
        t = ICMPV6_ECHO_REPLY if reply else ICMPV6_ECHO_REQUEST
        body = struct.pack("!BBHHH", t, 0, 0, ident, seq) + payload
        ck = internet_checksum(body, _pseudo_sum_raw(s, d, ICMPV6, len(body)))
        proto = ICMPV6
    body = body[:2] + ck.to_bytes(2, "big") + body[4:]
    return _wrap(fam, s, d, proto, body, dscp, 0, ttl, 0)


class UDPTemplate:
    """Fast builder of many UDP packets of one flow (the endpoint's reply path).

    Pre-computes the IP header and the pseudo-header/port part of the UDP checksum; each
    :meth:`build` does one checksum pass over the payload and two small header patches.
    """

    __slots__ = (
        "_dport",
        "_dst",
        "_fam",
        "_hdr",
        "_ip_sum",
        "_sport",
        "_src",
        "_tos",
        "_ttl",
        "_udp_sum",
    )

    def __init__(self, src: str, dst: str, sport: int, dport: int, *, dscp: int = 0,
                 ttl: int = 64, ecn: int = 0) -> None:
        fam, s, d = _pack_pair(src, dst)
        _check_port(sport, "sport")
        _check_port(dport, "dport")
        self._fam = fam
        self._src, self._dst = s, d
        self._sport, self._dport = sport, dport
        self._ttl = ttl
        self._tos = (dscp & 0x3F) << 2 | (ecn & 3)
        # UDP checksum part independent of payload and length: addresses, proto, ports.
        self._udp_sum = checksum_add(d, checksum_add(s, UDP + sport + dport))
        if fam == 4:
            self._hdr = struct.pack("!BBHHHBBH4s4s", 0x45, self._tos, 0, 0, 0, ttl, UDP, 0, s, d)
            self._ip_sum = checksum_add(self._hdr)
        else:
            self._hdr = struct.pack("!IHBB16s16s", 6 << 28 | self._tos << 20, 0, UDP, ttl, s, d)
            self._ip_sum = 0

    @property
    def family(self) -> int:
        return self._fam

    def build(self, payload: bytes | bytearray | memoryview) -> bytes:
        """The whole IP packet carrying ``payload``."""
        ulen = 8 + len(payload)
        # length appears twice in the UDP checksum: pseudo header and UDP header (RFC 768)
        ck = ~checksum_add(payload, self._udp_sum + ulen + ulen) & 0xFFFF or 0xFFFF
        udp = ((self._sport << 48) | (self._dport << 32) | (ulen << 16) | ck).to_bytes(8, "big")
        if self._fam == 4:
            total = 20 + ulen
            if total > 0xFFFF:
                raise ValueError(f"UDP datagram too long ({ulen} bytes)")
            s = self._ip_sum + total
            s = (s & 0xFFFF) + (s >> 16)
            ipck = ~s & 0xFFFF
            h = self._hdr
            return b"".join((h[:2], total.to_bytes(2, "big"), h[4:10], ipck.to_bytes(2, "big"),
                             h[12:], udp, payload))
        if ulen > 0xFFFF:
            raise ValueError(f"UDP datagram too long ({ulen} bytes)")
        h = self._hdr
        return b"".join((h[:4], ulen.to_bytes(2, "big"), h[6:], udp, payload))
