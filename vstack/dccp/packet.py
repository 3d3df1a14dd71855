"""DCCP packet codec (RFC 4340 §5), sans-IO: bytes in, ``DccpPacket`` out, and back.

Wire layout (§5.1 generic header, X=1 / X=0)::

    0-1 Source Port | 2-3 Dest Port | 4 Data Offset | 5 CCVal(4) CsCov(4) | 6-7 Checksum
    8 Res(3) Type(4) X(1) | X=1: 9 Reserved, 10-15 Sequence Number (48 bits)
                          | X=0: 9-11 Sequence Number (24 bits)

then the Acknowledgement Number subheader (§5.2; X=1: 2 reserved + 6 bytes, X=0: 1 + 3) on
every type but Request and Data, the Service Code (§5.3, 5.4) on Request and Response, the
Reset Code and Data 1-3 (§5.6) on Reset, the options (§5.8) up to Data Offset * 4, and the
application data area.

Errors: anything wrong with received bytes raises ``DccpParseError`` (a remote error; the
caller counts and drops), a bad checksum its subclass ``DccpChecksumError``. Asking ``encode``
for an impossible packet raises ``DccpEncodeError`` (a local error, a ValueError).

DCCP-UDP (RFC 6773): ``encap_udp``/``encode_udp`` and ``decap_udp``/``decode_udp`` put a UDP
header in front of the whole DCCP packet and take it off; the UDP checksum replaces the DCCP
one, whose field is sent as zero and ignored on receipt (``decode(..., verify=False)``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

from vstack.dccp.checksum import Address, check, compute_checksum, internet_checksum, pseudo_sum
from vstack.dccp.options import (
    DccpOptionError,
    DccpParseError,
    Option,
    decode_options,
    encode_options,
)

__all__ = [
    "ACK_TYPES",
    "DCCP_UDP_MIN_LEN",
    "DCCP_UDP_PORT",
    "MAX_SEQ",
    "DataEncoder",
    "DccpChecksumError",
    "DccpEncodeError",
    "DccpOptionError",
    "DccpPacket",
    "DccpParseError",
    "PacketType",
    "ResetCode",
    "UdpDatagram",
    "UdpDccpPacket",
    "check",
    "check_udp_payload",
    "decap_udp",
    "decode",
    "decode_udp",
    "encap_udp",
    "encode",
    "encode_data",
    "encode_data_into",
    "encode_udp",
    "header_length",
    "plain_data",
    "zero_dccp_checksum",
]


class PacketType(IntEnum):
    """Packet types (RFC 4340 §5.1, table 1); 10-15 are reserved and ignored."""

    REQUEST = 0
    RESPONSE = 1
    DATA = 2
    ACK = 3
    DATAACK = 4
    CLOSEREQ = 5
    CLOSE = 6
    RESET = 7
    SYNC = 8
    SYNCACK = 9


class ResetCode(IntEnum):
    """Reset codes (RFC 4340 §5.6, table 2)."""

    UNSPECIFIED = 0
    CLOSED = 1
    ABORTED = 2
    NO_CONNECTION = 3
    PACKET_ERROR = 4
    OPTION_ERROR = 5
    MANDATORY_ERROR = 6
    CONNECTION_REFUSED = 7
    BAD_SERVICE_CODE = 8
    TOO_BUSY = 9
    BAD_INIT_COOKIE = 10
    AGGRESSION_PENALTY = 11
    ENCAPSULATED_PORT_REUSE = 12  # RFC 6773 §3.8, §7.2 (DCCP-UDP; Data 1: type, 2-3: UDP sport)


# Types with an Acknowledgement Number subheader: all but Request and Data (§5.2).
ACK_TYPES = frozenset(PacketType) - {PacketType.REQUEST, PacketType.DATA}
# Types that may use short (24-bit) sequence numbers (§5.1: the others MUST set X=1).
SHORT_OK_TYPES = frozenset({PacketType.DATA, PacketType.ACK, PacketType.DATAACK})
MAX_SEQ = (1 << 48) - 1


class DccpChecksumError(DccpParseError):
    """The checksum is wrong (§9). ``received`` and ``expected`` are the two values."""

    def __init__(self, received: int, expected: int) -> None:
        super().__init__(f"bad checksum 0x{received:04x}, expected 0x{expected:04x}")
        self.received = received
        self.expected = expected


class DccpEncodeError(ValueError):
    """A DccpPacket that cannot go on the wire (a local error, not the peer's)."""


@dataclass(frozen=True, slots=True)
class DccpPacket:
    """One DCCP packet. ``ack`` is set exactly for the types in ACK_TYPES; ``service_code``
    exactly for Request and Response; ``reset_code`` for Reset (with ``reset_data``, the
    three bytes Data 1-3). ``x``: 48-bit (True) or 24-bit sequence numbers."""

    type: PacketType
    sport: int
    dport: int
    seq: int
    ack: int | None = None
    x: bool = True
    ccval: int = 0
    cscov: int = 0
    options: tuple[Option, ...] = ()
    payload: bytes = b""
    service_code: int | None = None
    reset_code: int | None = None
    reset_data: bytes = field(default=b"\x00\x00\x00")


def _header_length(ptype: int, x: bool) -> int:
    n = 16 if x else 12
    if ptype in ACK_TYPES:
        n += 8 if x else 4
    if ptype in (PacketType.REQUEST, PacketType.RESPONSE, PacketType.RESET):
        n += 4
    return n


_HLEN = {(t, x): _header_length(t, x) for t in range(10) for x in (False, True)}
_TYPES = tuple(PacketType)


def header_length(ptype: PacketType | int, x: bool = True) -> int:
    """Bytes of the fixed header (generic + ack subheader + type-specific), no options."""
    return _HLEN[int(ptype), bool(x)]


# --- encode ------------------------------------------------------------------------------


def _validate(pkt: DccpPacket) -> None:
    t = pkt.type
    if not isinstance(t, PacketType):
        raise DccpEncodeError(f"not a packet type: {t!r}")
    if not (0 <= pkt.sport <= 0xFFFF and 0 <= pkt.dport <= 0xFFFF):
        raise DccpEncodeError("ports must be 0-65535")
    bits = 48 if pkt.x else 24
    if not pkt.x and t not in SHORT_OK_TYPES:
        raise DccpEncodeError(f"{t.name} must use X=1 (RFC 4340 §5.1)")
    if not 0 <= pkt.seq < 1 << bits:
        raise DccpEncodeError(f"seq {pkt.seq} does not fit {bits} bits")
    if t in ACK_TYPES:
        if pkt.ack is None or not 0 <= pkt.ack < 1 << bits:
            raise DccpEncodeError(f"{t.name} needs an ack number of {bits} bits")
    elif pkt.ack is not None:
        raise DccpEncodeError(f"{t.name} carries no ack number")
    if t in (PacketType.REQUEST, PacketType.RESPONSE):
        if pkt.service_code is None or not 0 <= pkt.service_code <= 0xFFFFFFFF:
            raise DccpEncodeError(f"{t.name} needs a 32-bit service code")
    elif pkt.service_code is not None:
        raise DccpEncodeError(f"{t.name} carries no service code")
    if t == PacketType.RESET:
        if pkt.reset_code is None or not 0 <= pkt.reset_code <= 255:
            raise DccpEncodeError("RESET needs a reset code 0-255")
        if len(pkt.reset_data) != 3:
            raise DccpEncodeError("reset_data must be 3 bytes (Data 1-3)")
    elif pkt.reset_code is not None or pkt.reset_data != b"\x00\x00\x00":
        raise DccpEncodeError(f"{t.name} carries no reset code or data")
    if not 0 <= pkt.ccval <= 15 or not 0 <= pkt.cscov <= 15:
        raise DccpEncodeError("ccval and cscov are 4-bit fields")


def _header(pkt: DccpPacket, opts: bytes) -> bytearray:
    t = pkt.type
    hlen = header_length(t, pkt.x) + len(opts)
    doff = hlen // 4
    if doff > 255:
        raise DccpEncodeError(f"header of {hlen} bytes exceeds Data Offset (1020 bytes)")
    h = bytearray(hlen)
    struct.pack_into("!HHBB", h, 0, pkt.sport, pkt.dport, doff, (pkt.ccval << 4) | pkt.cscov)
    if pkt.x:
        h[8] = (t << 1) | 1
        h[10:16] = pkt.seq.to_bytes(6, "big")
        i = 16
        if pkt.ack is not None:
            h[18:24] = pkt.ack.to_bytes(6, "big")
            i = 24
    else:
        h[8] = t << 1
        h[9:12] = pkt.seq.to_bytes(3, "big")
        i = 12
        if pkt.ack is not None:
            h[13:16] = pkt.ack.to_bytes(3, "big")
            i = 16
    if pkt.service_code is not None:
        struct.pack_into("!I", h, i, pkt.service_code)
        i += 4
    elif pkt.reset_code is not None:
        h[i] = pkt.reset_code
        h[i + 1 : i + 4] = pkt.reset_data
        i += 4
    h[i:] = opts
    return h


def encode(pkt: DccpPacket, src_ip: Address | None, dst_ip: Address | None) -> bytes:
    """The packet's bytes, options padded to 4 bytes, checksum per CsCov (§9).

    ``src_ip``/``dst_ip`` (str, bytes or ipaddress; both IPv4 or both IPv6) give the
    pseudo-header. Both None: the checksum field is left zero (a caller that fills it in
    itself). Raises DccpEncodeError (a ValueError) for anything that cannot be encoded.
    """
    _validate(pkt)
    try:
        opts = encode_options(pkt.options)
    except (ValueError, TypeError, OverflowError) as e:
        raise DccpEncodeError(f"bad option: {e}") from e
    h = _header(pkt, opts)
    cov_payload = len(pkt.payload) if pkt.cscov == 0 else (pkt.cscov - 1) * 4
    if cov_payload > len(pkt.payload):
        raise DccpEncodeError(
            f"CsCov {pkt.cscov} covers {cov_payload} payload bytes, only {len(pkt.payload)}"
        )
    if (src_ip is None) != (dst_ip is None):
        raise DccpEncodeError("give both src_ip and dst_ip, or neither")
    if src_ip is not None and dst_ip is not None:
        total = len(h) + len(pkt.payload)
        s = pseudo_sum(src_ip, dst_ip, total)
        # The header is a 4-byte multiple, so the payload's words line up with it.
        csum = internet_checksum(pkt.payload[:cov_payload], s + int.from_bytes(h, "big") % 0xFFFF)
        h[6] = csum >> 8
        h[7] = csum & 0xFF
    return bytes(h) + pkt.payload


# --- fast path for DATA / DATAACK ----------------------------------------------------------


def encode_data_into(
    buf: bytearray,
    offset: int,
    *,
    sport: int,
    dport: int,
    seq: int,
    payload: bytes | bytearray | memoryview,
    ack: int | None = None,
    options: bytes = b"",
    ccval: int = 0,
    cscov: int = 0,
    src_ip: Address | None = None,
    dst_ip: Address | None = None,
) -> int:
    """Write a DCCP-Data (``ack`` None) or DCCP-DataAck with X=1 into ``buf`` at ``offset``.

    ``options`` are pre-encoded option bytes (``encode_options``, a multiple of 4 bytes), so
    the hot loop builds no option objects. ``buf`` must have room; returns bytes written.
    Checksum as in ``encode`` (zero when no addresses are given).
    """
    if len(options) & 3:
        raise DccpEncodeError("pre-encoded options must be a multiple of 4 bytes")
    hlen = (24 if ack is not None else 16) + len(options)
    n = hlen + len(payload)
    if offset < 0 or offset + n > len(buf):
        raise DccpEncodeError(f"buffer too small: need {n} bytes at offset {offset}")
    if not 0 <= seq <= MAX_SEQ:
        raise DccpEncodeError(f"seq {seq} does not fit 48 bits")
    if not (
        0 <= sport <= 0xFFFF and 0 <= dport <= 0xFFFF and 0 <= ccval <= 15 and 0 <= cscov <= 15
    ):
        raise DccpEncodeError("ports are 16-bit, ccval and cscov 4-bit fields")
    if ack is None:
        struct.pack_into(
            "!HHBBHBBHI", buf, offset, sport, dport, hlen >> 2, (ccval << 4) | cscov, 0,
            (PacketType.DATA << 1) | 1, 0, seq >> 32, seq & 0xFFFFFFFF,
        )  # fmt: skip
    else:
        if not 0 <= ack <= MAX_SEQ:
            raise DccpEncodeError(f"ack {ack} does not fit 48 bits")
        struct.pack_into(
            "!HHBBHBBHIHHI", buf, offset, sport, dport, hlen >> 2, (ccval << 4) | cscov, 0,
            (PacketType.DATAACK << 1) | 1, 0, seq >> 32, seq & 0xFFFFFFFF,
            0, ack >> 32, ack & 0xFFFFFFFF,
        )  # fmt: skip
    o = offset + hlen - len(options)
    buf[o : o + len(options)] = options
    buf[offset + hlen : offset + n] = payload
    if src_ip is not None and dst_ip is not None:
        cov = n if cscov == 0 else min(hlen + (cscov - 1) * 4, n)
        csum = internet_checksum(
            memoryview(buf)[offset : offset + cov], pseudo_sum(src_ip, dst_ip, n)
        )
        buf[offset + 6] = csum >> 8
        buf[offset + 7] = csum & 0xFF
    return n


def encode_data(
    *,
    sport: int,
    dport: int,
    seq: int,
    payload: bytes | bytearray | memoryview,
    ack: int | None = None,
    options: bytes = b"",
    ccval: int = 0,
    cscov: int = 0,
    src_ip: Address | None = None,
    dst_ip: Address | None = None,
) -> bytes:
    """``encode_data_into`` into a fresh buffer; returns the packet's bytes."""
    buf = bytearray((24 if ack is not None else 16) + len(options) + len(payload))
    encode_data_into(
        buf, 0, sport=sport, dport=dport, seq=seq, payload=payload, ack=ack,
        options=options, ccval=ccval, cscov=cscov, src_ip=src_ip, dst_ip=dst_ip,
    )  # fmt: skip
    return bytes(buf)


class DataEncoder:
    """One connection's DCCP-Data / DataAck headers, packed into the caller's (preallocated)
    buffer: the send hot path of issue 6. The fixed fields (ports, Data Offset, type, X=1,
    CCVal 0, CsCov 0, no options) are bound once; each packet costs one precompiled
    ``pack_into`` and the payload's copy, no objects. Byte for byte what :func:`encode`
    writes for the same packet (a Hypothesis test checks it). The checksum field is zero
    (DCCP-UDP, RFC 6773 §3.3) unless the pseudo-header addresses are given (raw DCCP)."""

    __slots__ = ("dport", "sport")

    def __init__(self, sport: int, dport: int) -> None:
        if not (0 <= sport <= 0xFFFF and 0 <= dport <= 0xFFFF):
            raise DccpEncodeError("ports must be 0-65535")
        self.sport = sport
        self.dport = dport

    @staticmethod
    def plain(pkt: DccpPacket) -> bool:
        """``pkt`` is one this encoder writes (else use :func:`encode`)."""
        return (pkt.type is PacketType.DATA or pkt.type is PacketType.DATAACK) and (
            pkt.x and not pkt.options and not pkt.cscov and not pkt.ccval)

    def pack_into(self, buf: bytearray, offset: int, seq: int,
                  payload: bytes | bytearray | memoryview, ack: int | None = None,
                  src_ip: Address | None = None, dst_ip: Address | None = None) -> int:
        """Write the packet at ``offset`` (``buf`` must have room); returns its length."""
        if ack is None:
            hlen = 16
            _DATA_HDR.pack_into(buf, offset, self.sport, self.dport, 4, 0, 0, _DATA_X, 0,
                                seq >> 32, seq & 0xFFFFFFFF)
        else:
            hlen = 24
            _DATAACK_HDR.pack_into(buf, offset, self.sport, self.dport, 6, 0, 0, _DATAACK_X,
                                   0, seq >> 32, seq & 0xFFFFFFFF, 0, ack >> 32,
                                   ack & 0xFFFFFFFF)
        n = hlen + len(payload)
        buf[offset + hlen:offset + n] = payload
        if src_ip is not None and dst_ip is not None:
            csum = internet_checksum(memoryview(buf)[offset:offset + n],
                                     pseudo_sum(src_ip, dst_ip, n))
            buf[offset + 6] = csum >> 8
            buf[offset + 7] = csum & 0xFF
        return n


# --- decode ------------------------------------------------------------------------------


_DATA_HDR = struct.Struct("!HHBBHBBHI")
_DATAACK_HDR = struct.Struct("!HHBBHBBHIHHI")
_DATAACK_X = (PacketType.DATAACK << 1) | 1
_DATA_X = (PacketType.DATA << 1) | 1  # byte 8 of an X=1 DCCP-Data
_UNPACK_SEQ = struct.Struct("!HI").unpack_from


def plain_data(data: bytes | bytearray | memoryview) -> tuple[int, int, int, bytes] | None:
    """The fast receive path (issue 6): ``(sport, dport, seq, payload)`` when ``data`` is
    a DCCP-Data with X=1, no options (Data Offset 4 words) and CsCov 0, else None (use
    :func:`decode`). The checksum is not looked at: for DCCP-UDP it is ignored (RFC 6773
    §3.3); raw DCCP callers verify it first. One copy: the payload, as bytes."""
    if len(data) < 16 or data[8] != _DATA_X or data[4] != 4 or data[5] & 0x0F:
        return None
    hi, lo = _UNPACK_SEQ(data, 10)
    return ((data[0] << 8) | data[1], (data[2] << 8) | data[3], (hi << 32) | lo,
            bytes(data[16:]))



def decode(
    data: bytes | bytearray | memoryview,
    src_ip: Address | None = None,
    dst_ip: Address | None = None,
    *,
    verify: bool = True,
    strict: bool = True,
    wire_len: int | None = None,
) -> DccpPacket:
    """Parse one DCCP packet. Raises only DccpParseError (DccpChecksumError for the checksum).

    ``verify`` checks the checksum against the pseudo-header of ``src_ip``/``dst_ip``; it
    needs both (a ValueError otherwise: that is the caller's bug, not the peer's).
    ``strict`` (the default, as RFC 4340 §5.1 requires) rejects X=0 on types that must
    use X=1; ``strict=False`` decodes them anyway (diagnostics, tcpdump's view).
    Reserved fields are ignored (§5.1). CsCov past the end of the packet is rejected (§9.2).
    ``wire_len``: for a truncated capture, the packet's length on the wire (CsCov is checked
    against it; the payload is what was captured; the checksum cannot be verified).
    """
    buf = bytes(data)
    n = len(buf)
    if wire_len is not None:
        if wire_len < n:
            raise ValueError("wire_len is shorter than the captured data")
        if verify and wire_len != n:
            raise ValueError("cannot verify the checksum of a truncated capture")
    total = n if wire_len is None else wire_len
    if n < 12:
        raise DccpParseError(f"packet of {n} bytes is shorter than the 12-byte header")
    doff = buf[4]
    ptype = (buf[8] >> 1) & 0x0F
    x = bool(buf[8] & 1)
    if ptype > 9:
        raise DccpParseError(f"reserved packet type {ptype}")
    t = _TYPES[ptype]
    if not x and t not in SHORT_OK_TYPES and strict:
        raise DccpParseError(f"{t.name} with X=0 (RFC 4340 §5.1: must be ignored)")
    fixed = _HLEN[ptype, x]
    hlen = doff * 4
    if hlen < fixed:
        raise DccpParseError(f"data offset {doff} words < {t.name} header of {fixed} bytes")
    if hlen > n:
        raise DccpParseError(f"data offset {doff} words runs past the {n}-byte packet")
    cscov = buf[5] & 0x0F
    if cscov and (doff + cscov - 1) * 4 > total:
        raise DccpParseError(f"CsCov {cscov} covers more than the {total}-byte packet")
    if verify:
        if src_ip is None or dst_ip is None:
            raise ValueError("decode(verify=True) needs src_ip and dst_ip")
        expected = compute_checksum(buf, src_ip, dst_ip)
        received = (buf[6] << 8) | buf[7]
        if expected != received:
            raise DccpChecksumError(received, expected)
    sport, dport = struct.unpack_from("!HH", buf, 0)
    ack: int | None = None
    if x:
        seq = int.from_bytes(buf[10:16], "big")
        i = 16
        if t in ACK_TYPES:
            ack = int.from_bytes(buf[18:24], "big")
            i = 24
    else:
        seq = int.from_bytes(buf[9:12], "big")
        i = 12
        if t in ACK_TYPES:
            ack = int.from_bytes(buf[13:16], "big")
            i = 16
    service_code: int | None = None
    reset_code: int | None = None
    reset_data = b"\x00\x00\x00"
    if t in (PacketType.REQUEST, PacketType.RESPONSE):
        (service_code,) = struct.unpack_from("!I", buf, i)
        i += 4
    elif t == PacketType.RESET:
        reset_code = buf[i]
        reset_data = buf[i + 1 : i + 4]
        i += 4
    options: tuple[Option, ...] = ()
    option_error: DccpOptionError | None = None
    if hlen > i:
        try:
            options = decode_options(buf[i:hlen])
        except DccpOptionError as e:
            option_error = e
    pkt = DccpPacket(
        type=t,
        sport=sport,
        dport=dport,
        seq=seq,
        ack=ack,
        x=x,
        ccval=buf[5] >> 4,
        cscov=cscov,
        options=options,
        payload=buf[hlen:],
        service_code=service_code,
        reset_code=reset_code,
        reset_data=reset_data,
    )
    if option_error is not None:
        option_error.packet = pkt  # the header, options left out: for a Reset (Option Error)
        raise option_error
    return pkt


# --- DCCP-UDP (RFC 6773) -------------------------------------------------------------------
#
# RFC 6773 §3: a UDP header (RFC 768) is *inserted* between the IP header and an unchanged
# DCCP packet (generic header with its own Source/Dest Port, type-specific fields, options,
# data)::
#
#     IP | UDP: sport dport length checksum | DCCP: sport dport doff ccval/cscov checksum ...
#
# The UDP ports are the ports the two ends receive DCCP-UDP on; they are not the DCCP ports
# (§3.1). The UDP checksum does the DCCP checksum's job (§3.3): it covers the pseudo-header
# (protocol 17) and the whole datagram and is never zero; the DCCP Checksum field is sent as
# zero and ignored on receipt. CsCov keeps its syntax, but coverage is always complete
# (§3.3.1).

IPPROTO_UDP = 17
UDP_HEADER_LEN = 8
DCCP_UDP_MIN_LEN = 20  # UDP header + the 12-byte minimum DCCP generic header (§3.3)
DCCP_UDP_PORT = 6511  # IANA's default DCCP-UDP listening port (§3.8, §7.1)


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    """A DCCP-UDP datagram taken apart: the UDP ports and the DCCP packet (UDP payload)."""

    sport: int
    dport: int
    dccp: bytes


@dataclass(frozen=True, slots=True)
class UdpDccpPacket:
    """A decoded DCCP-UDP datagram: the UDP ports and the DCCP packet they carried."""

    udp_sport: int
    udp_dport: int
    packet: DccpPacket


def check_udp_payload(payload: bytes | bytearray | memoryview) -> None:
    """The RFC 6773 §3.3 length rules for a UDP payload that should hold DCCP.

    For a caller that got the payload from a UDP socket: the kernel has already checked the
    UDP checksum (a wrong one never arrives) and that the UDP Length fits the packet. What is
    left: the UDP Length (payload + 8) must be at least 20, and at least 8 + the whole DCCP
    header (Data Offset * 4: generic header, type-specific fields and options). Raises
    DccpParseError (count and drop) otherwise.
    """
    n = len(payload)
    if n + UDP_HEADER_LEN < DCCP_UDP_MIN_LEN:
        raise DccpParseError(
            f"UDP length {n + UDP_HEADER_LEN} < {DCCP_UDP_MIN_LEN} (RFC 6773 §3.3)"
        )
    hlen = payload[4] * 4
    if hlen > n:
        raise DccpParseError(
            f"UDP length {n + UDP_HEADER_LEN} < UDP header + {hlen}-byte DCCP header"
            " (RFC 6773 §3.3)"
        )


def zero_dccp_checksum(dccp: bytes | bytearray | memoryview) -> bytes:
    """``dccp`` with its DCCP Checksum field set to zero (RFC 6773 §3.3, on transmit)."""
    b = bytes(dccp)
    if len(b) < 8:
        raise DccpEncodeError("not a DCCP packet: shorter than 8 bytes")
    if b[6] or b[7]:
        b = b[:6] + b"\x00\x00" + b[8:]
    return b


def encap_udp(
    dccp: bytes | bytearray | memoryview,
    src_ip: Address,
    dst_ip: Address,
    sport: int,
    dport: int,
) -> bytes:
    """A DCCP-UDP datagram (UDP header + DCCP packet) carrying the encoded packet ``dccp``.

    ``sport``/``dport`` are the UDP ports (RFC 6773 §3.1), independent of the DCCP ports in
    ``dccp``, which stay where they are (§3.2). The DCCP Checksum field is set to zero
    (§3.3); the UDP checksum covers the IP pseudo-header (protocol 17) and the whole
    datagram, and a computed zero is sent as 0xFFFF (RFC 768), as zero is not allowed
    (§3.1). For a raw socket; a UDP socket takes the DCCP packet alone (the kernel writes the
    UDP header).
    """
    if not (0 <= sport <= 0xFFFF and 0 <= dport <= 0xFFFF):
        raise DccpEncodeError("UDP ports must be 0-65535")
    body = zero_dccp_checksum(dccp)
    if len(body) < 12:
        raise DccpEncodeError("not a DCCP packet: shorter than 12 bytes")
    ulen = UDP_HEADER_LEN + len(body)
    if ulen > 0xFFFF:
        raise DccpEncodeError("datagram too long for UDP")
    head = struct.pack("!HHHH", sport, dport, ulen, 0)
    csum = internet_checksum(head + body, pseudo_sum(src_ip, dst_ip, ulen, IPPROTO_UDP))
    if csum == 0:
        csum = 0xFFFF
    return head[:6] + csum.to_bytes(2, "big") + body


def decap_udp(
    datagram: bytes | bytearray | memoryview,
    src_ip: Address | None = None,
    dst_ip: Address | None = None,
) -> UdpDatagram:
    """Check a received DCCP-UDP datagram (UDP header first) and take it apart (§3.3).

    Dropped (DccpParseError) when: shorter than a UDP header; UDP Length < 20; UDP Length
    longer than the datagram, or shorter than UDP header + the whole DCCP header (Data
    Offset); a zero UDP checksum. With ``src_ip``/``dst_ip`` the UDP checksum is verified
    (DccpChecksumError). Bytes past the UDP Length are not part of the datagram and are cut
    off, as UDP does. The DCCP Checksum field is not looked at: decode the result with
    ``decode(..., verify=False)`` (or use ``decode_udp``).
    """
    d = bytes(datagram)
    if len(d) < UDP_HEADER_LEN:
        raise DccpParseError(f"DCCP-UDP datagram of {len(d)} bytes is too short")
    sport, dport, ulen, received = struct.unpack_from("!HHHH", d, 0)
    if ulen < DCCP_UDP_MIN_LEN:
        raise DccpParseError(f"UDP length {ulen} < {DCCP_UDP_MIN_LEN} (RFC 6773 §3.3)")
    if ulen > len(d):
        raise DccpParseError(f"UDP length {ulen} > the {len(d)}-byte datagram")
    d = d[:ulen]
    if received == 0:
        raise DccpParseError("UDP checksum is zero (RFC 6773 §3.3: DCCP-UDP needs one)")
    if src_ip is not None and dst_ip is not None:
        s = pseudo_sum(src_ip, dst_ip, ulen, IPPROTO_UDP)
        expected = internet_checksum(d[:6] + b"\x00\x00" + d[8:], s)
        if expected == 0:
            expected = 0xFFFF
        if expected != received:
            raise DccpChecksumError(received, expected)
    elif (src_ip is None) != (dst_ip is None):
        raise ValueError("give both src_ip and dst_ip, or neither")
    body = d[UDP_HEADER_LEN:]
    check_udp_payload(body)
    return UdpDatagram(sport, dport, body)


def encode_udp(pkt: DccpPacket, src_ip: Address, dst_ip: Address, sport: int, dport: int) -> bytes:
    """``pkt`` as a whole DCCP-UDP datagram: ``encode`` with the DCCP checksum left zero,
    then ``encap_udp`` with UDP ports ``sport``/``dport``."""
    return encap_udp(encode(pkt, None, None), src_ip, dst_ip, sport, dport)


def decode_udp(
    datagram: bytes | bytearray | memoryview,
    src_ip: Address | None = None,
    dst_ip: Address | None = None,
    *,
    strict: bool = True,
) -> UdpDccpPacket:
    """``decap_udp`` then ``decode`` with the DCCP checksum ignored (RFC 6773 §3.3).

    Raises DccpParseError (DccpChecksumError for a wrong UDP checksum) like both.
    """
    u = decap_udp(datagram, src_ip, dst_ip)
    return UdpDccpPacket(u.sport, u.dport, decode(u.dccp, verify=False, strict=strict))
