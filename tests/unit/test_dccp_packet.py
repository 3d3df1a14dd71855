"""DCCP codec properties: build -> parse round trips for every packet type and option, X=0 and
X=1, IPv4 and IPv6; random and truncated bytes only ever raise DccpParseError; CsCov."""

from __future__ import annotations

import dataclasses
import ipaddress
import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from vstack.analysis.packet import build_ipv4, build_ipv6, verify_l4_checksum
from vstack.dccp.checksum import check, compute_checksum, internet_checksum, pseudo_header
from vstack.dccp.options import (
    NN_FEATURE_WIDTH,
    AckVector,
    CcidOption,
    ChangeL,
    ChangeR,
    ConfirmL,
    ConfirmR,
    DataChecksum,
    DataDropped,
    ElapsedTime,
    Feature,
    InitCookie,
    Mandatory,
    NdpCount,
    Option,
    Padding,
    SlowReceiver,
    Timestamp,
    TimestampEcho,
    UnknownOption,
    crc32c,
    decode_options,
    encode_options,
    strip_padding,
)
from vstack.dccp.packet import (
    ACK_TYPES,
    DCCP_UDP_MIN_LEN,
    DccpChecksumError,
    DccpEncodeError,
    DccpOptionError,
    DccpPacket,
    DccpParseError,
    PacketType,
    ResetCode,
    check_udp_payload,
    decap_udp,
    decode,
    decode_udp,
    encap_udp,
    encode,
    encode_data,
    encode_data_into,
    encode_udp,
    header_length,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ADDRS = st.sampled_from(
    [("10.77.0.1", "10.77.0.2"), ("192.0.2.200", "198.51.100.7"), ("fd77::1", "fd77::2"),
     ("2001:db8::dead:beef", "fe80::1")]
)  # fmt: skip

u8 = st.integers(0, 0xFF)
u32 = st.integers(0, 0xFFFFFFFF)


@st.composite
def feature_options(draw: st.DrawFn) -> Option:
    classes: list[type[ChangeL | ChangeR | ConfirmL | ConfirmR]] = [
        ChangeL,
        ChangeR,
        ConfirmL,
        ConfirmR,
    ]
    cls = draw(st.sampled_from(classes))
    feature = draw(st.one_of(st.sampled_from(list(Feature)), st.integers(0, 255)))
    if feature in NN_FEATURE_WIDTH:
        if draw(st.booleans()):
            return cls(feature, ())  # an empty Confirm: "unknown feature"
        width = draw(st.integers(1, 6))
        value = draw(st.integers(0, (1 << (8 * width)) - 1))
        return cls(feature, (value,), width)
    return cls(feature, tuple(draw(st.lists(u8, max_size=8))))


options_st: st.SearchStrategy[Option] = st.one_of(
    st.just(Mandatory()),
    st.just(SlowReceiver()),
    feature_options(),
    st.builds(InitCookie, st.binary(max_size=40)),
    st.builds(NdpCount, st.integers(0, (1 << 48) - 1)),
    st.builds(AckVector, st.integers(0, 1), st.binary(max_size=40)),
    st.builds(DataDropped, st.binary(max_size=10)),
    st.builds(Timestamp, u32),
    st.builds(TimestampEcho, u32, st.none() | u32),
    st.builds(ElapsedTime, u32),
    st.builds(DataChecksum, u32),
    st.builds(CcidOption, st.integers(128, 255), st.binary(max_size=20)),
    st.builds(UnknownOption, st.integers(3, 31)),
    st.builds(UnknownOption, st.integers(45, 127), st.binary(max_size=20)),
)


@st.composite
def packets(draw: st.DrawFn, types: list[PacketType] | None = None) -> DccpPacket:
    t = draw(st.sampled_from(types or list(PacketType)))
    x = draw(st.booleans()) if t in (PacketType.DATA, PacketType.ACK, PacketType.DATAACK) else True
    bits = 48 if x else 24
    seqno = st.integers(0, (1 << bits) - 1)
    payload = draw(st.binary(max_size=64))
    cscov = draw(st.integers(0, min(15, len(payload) // 4 + 1)))
    return DccpPacket(
        type=t,
        sport=draw(st.integers(0, 0xFFFF)),
        dport=draw(st.integers(0, 0xFFFF)),
        seq=draw(seqno),
        ack=draw(seqno) if t in ACK_TYPES else None,
        x=x,
        ccval=draw(st.integers(0, 15)),
        cscov=cscov,
        options=tuple(draw(st.lists(options_st, max_size=8))),
        payload=payload,
        service_code=draw(u32) if t in (PacketType.REQUEST, PacketType.RESPONSE) else None,
        reset_code=draw(u8) if t == PacketType.RESET else None,
        reset_data=draw(st.binary(min_size=3, max_size=3))
        if t == PacketType.RESET
        else b"\x00\x00\x00",
    )


def unpadded(p: DccpPacket) -> DccpPacket:
    return dataclasses.replace(p, options=strip_padding(p.options))


# --- round trips -------------------------------------------------------------------------------


@FAST
@given(packets(), ADDRS)
def test_build_parse_round_trip(pkt: DccpPacket, addrs: tuple[str, str]) -> None:
    src, dst = addrs
    wire = encode(pkt, src, dst)
    assert len(wire) % 4 == len(pkt.payload) % 4  # header and options: 32-bit words
    assert check(wire, src, dst)
    back = decode(wire, src, dst)
    assert unpadded(back) == pkt
    assert back.options[len(strip_padding(back.options)) :] == (Padding(),) * (
        len(back.options) - len(strip_padding(back.options))
    )
    # Decoded packets re-encode to the same bytes (Padding kept).
    assert encode(back, src, dst) == wire


def test_every_type_both_x() -> None:
    for t in PacketType:
        for x in (True, False):
            if not x and t not in (PacketType.DATA, PacketType.ACK, PacketType.DATAACK):
                p = DccpPacket(t, 1, 2, 3, ack=4 if t in ACK_TYPES else None, x=False)
                with pytest.raises(DccpEncodeError, match="X=1"):
                    encode(p, "10.0.0.1", "10.0.0.2")
                continue
            p = DccpPacket(
                t, 1000, 2000, 0xABCDEF if not x else 0xABCDEF012345,
                ack=(0x123456 if not x else 0x1234567890AB) if t in ACK_TYPES else None,
                x=x, ccval=5, payload=b"data",
                service_code=0x44434350 if t in (PacketType.REQUEST, PacketType.RESPONSE) else None,
                reset_code=ResetCode.BAD_SERVICE_CODE if t == PacketType.RESET else None,
                reset_data=b"\x01\x02\x03" if t == PacketType.RESET else b"\x00\x00\x00",
            )  # fmt: skip
            wire = encode(p, "fd77::1", "fd77::2")
            assert len(wire) == header_length(t, x) + 4
            assert wire[4] * 4 == header_length(t, x)
            assert decode(wire, "fd77::1", "fd77::2") == p


@FAST
@given(st.lists(options_st, max_size=12))
def test_options_round_trip(opts: list[Option]) -> None:
    raw = encode_options(opts)
    assert len(raw) % 4 == 0
    back = decode_options(raw)
    assert strip_padding(back) == tuple(opts)
    assert encode_options(back) == raw


def test_options_known_bytes() -> None:
    assert encode_options([ChangeL(Feature.CCID, (2, 3))]) == b"\x20\x05\x01\x02\x03\x00\x00\x00"
    assert encode_options([ChangeL(Feature.ACK_RATIO, (2,))], pad=False) == b"\x20\x05\x05\x00\x02"
    assert encode_options([ConfirmR(Feature.SEQUENCE_WINDOW, (100,))], pad=False) == (
        b"\x23\x09\x03" + (100).to_bytes(6, "big")
    )
    assert encode_options([ElapsedTime(1)], pad=False) == b"\x2b\x04\x00\x01"
    assert encode_options([ElapsedTime(70000)], pad=False) == b"\x2b\x06\x00\x01\x11\x70"
    assert encode_options([TimestampEcho(7)], pad=False) == b"\x2a\x06\x00\x00\x00\x07"
    assert encode_options([TimestampEcho(7, 1)], pad=False) == b"\x2a\x08\x00\x00\x00\x07\x00\x01"
    assert encode_options([NdpCount(0x0102)], pad=False) == b"\x25\x04\x01\x02"
    assert encode_options([AckVector(1, b"\xc0")], pad=False) == b"\x27\x03\xc0"
    assert encode_options([Mandatory(), SlowReceiver(), Padding()], pad=False) == b"\x01\x02\x00"
    # A CCID-specific option is passed on untouched.
    assert decode_options(b"\xc2\x04ab") == (CcidOption(0xC2, b"ab"),)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\x20", "truncated"),
        (b"\x20\x01", "length 1"),
        (b"\x26\x05\x00", "past"),
        (b"\x29\x05\x00\x00\x00", "timestamp"),
        (b"\x2a\x04\x00\x00", "timestamp_echo"),
        (b"\x2a\x07\x00\x00\x00\x00\x00", "timestamp_echo"),
        (b"\x2b\x03\x00", "elapsed_time"),
        (b"\x2b\x05\x00\x00\x00", "elapsed_time"),
        (b"\x2c\x05\x00\x00\x00", "data_checksum"),
        (b"\x25\x02", "ndp_count"),
        (b"\x25\x09" + b"\x00" * 7, "ndp_count"),
        (b"\x20\x02", "feature"),
        (b"\x22\x0a\x03" + b"\x00" * 7, "NN value"),
    ],
)
def test_bad_option_lengths(raw: bytes, reason: str) -> None:
    with pytest.raises(DccpParseError) as ei:
        decode_options(raw)
    assert reason in ei.value.reason


def test_feature_option_accessors() -> None:
    c = ConfirmL(Feature.CCID, (2, 3, 2))
    assert (c.value, c.preferences, c.is_nn) == (2, (3, 2), False)
    ch = ChangeR(Feature.CCID, (3, 2))
    assert (ch.value, ch.preferences) == (3, (3, 2))
    nn = ChangeL(Feature.SEQUENCE_WINDOW, (100,))
    assert nn.width == 6 and nn.is_nn  # RFC width by default
    assert ChangeL(Feature.CCID, (2,), width=4).width is None  # SP features have no width


# --- ack vectors -------------------------------------------------------------------------------


@FAST
@given(st.binary(max_size=50), st.integers(0, 1))
def test_ack_vector_runs_round_trip(cells: bytes, nonce: int) -> None:
    av = AckVector(nonce, cells)
    assert AckVector.from_runs(av.runs(), nonce) == av


def test_ack_vector_helpers() -> None:
    av = AckVector.from_runs([(0, 2), (3, 0), (1, 100)])
    # 100 + 1 = 101 packets split into 64 + 37.
    assert av.runs() == [(0, 2), (3, 0), (1, 63), (1, 36)]
    pk = list(av.packets(10))
    assert pk[:5] == [(10, 0), (9, 0), (8, 0), (7, 3), (6, 1)]
    assert len(pk) == 3 + 1 + 101
    # Wraps around zero in sequence space.
    assert list(AckVector.from_runs([(0, 1)]).packets(0)) == [(0, 0), ((1 << 48) - 1, 0)]
    with pytest.raises(ValueError):
        AckVector.from_runs([(4, 0)])


def test_data_dropped_blocks() -> None:
    assert DataDropped(b"\x05\xa3").blocks() == [(None, 5), (2, 3)]


def test_crc32c_vector() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # RFC 3720 B.4 check value


# --- bad input ---------------------------------------------------------------------------------


@FAST
@given(st.binary(max_size=120), ADDRS, st.booleans(), st.booleans())
def test_random_bytes_only_parse_errors(
    data: bytes, addrs: tuple[str, str], verify: bool, strict: bool
) -> None:
    try:
        decode(data, *addrs, verify=verify, strict=strict)
    except DccpParseError as e:
        assert e.reason
    try:
        decode_options(data)
    except DccpParseError as e:
        assert e.reason


@FAST
@given(packets(), ADDRS, st.data())
def test_truncations_only_parse_errors(
    pkt: DccpPacket, addrs: tuple[str, str], data: st.DataObject
) -> None:
    wire = encode(pkt, *addrs)
    cut = data.draw(st.integers(0, len(wire) - 1))
    short = wire[:cut]
    try:
        got = decode(short, *addrs, verify=False)
    except DccpParseError:
        return
    # Still decodable: the cut was inside the application data.
    assert cut >= wire[4] * 4
    assert unpadded(got) == dataclasses.replace(pkt, payload=pkt.payload[: cut - wire[4] * 4])
    with pytest.raises(DccpChecksumError):
        decode(short, *addrs)


def test_header_validation() -> None:
    good = encode(DccpPacket(PacketType.ACK, 1, 2, 3, ack=4), "10.0.0.1", "10.0.0.2")
    bad_doff = bytearray(good)
    bad_doff[4] = 2  # 8 bytes: less than the header
    with pytest.raises(DccpParseError, match="data offset"):
        decode(bytes(bad_doff), verify=False)
    bad_doff[4] = 200
    with pytest.raises(DccpParseError, match="past"):
        decode(bytes(bad_doff), verify=False)
    reserved = bytearray(good)
    reserved[8] = (12 << 1) | 1
    with pytest.raises(DccpParseError, match="reserved packet type"):
        decode(bytes(reserved), verify=False)
    with pytest.raises(DccpParseError, match="shorter"):
        decode(good[:11], verify=False)
    with pytest.raises(ValueError, match="needs src_ip"):
        decode(good)


def test_encode_rejects_impossible_packets() -> None:
    a = ("10.0.0.1", "10.0.0.2")
    for p in [
        DccpPacket(PacketType.ACK, 1, 2, 3),  # no ack
        DccpPacket(PacketType.DATA, 1, 2, 3, ack=1),  # Data has no ack
        DccpPacket(PacketType.REQUEST, 1, 2, 3),  # no service code
        DccpPacket(PacketType.RESET, 1, 2, 3, ack=1),  # no reset code
        DccpPacket(PacketType.DATA, 1, 2, 1 << 24, x=False),  # seq too big for 24 bits
        DccpPacket(PacketType.DATA, 1, 2, 3, cscov=3, payload=b"abc"),  # covers past the data
        DccpPacket(PacketType.DATA, 70000, 2, 3),
        DccpPacket(PacketType.DATA, 1, 2, 3, options=(InitCookie(b"x" * 253),) * 5),  # > 1020
        DccpPacket(PacketType.DATA, 1, 2, 3, options=(InitCookie(b"x" * 254),)),  # > 255
        DccpPacket(PacketType.DATA, 1, 2, 3, options=(Timestamp(1 << 32),)),
        DccpPacket(PacketType.DATA, 1, 2, 3, options=(ChangeL(Feature.CCID, (256,)),)),
        DccpPacket(PacketType.DATA, 1, 2, 3, options=(ChangeL(Feature.ACK_RATIO, (1, 2)),)),
        DccpPacket(PacketType.DATA, 1, 2, 3, options=(AckVector(2, b""),)),
        DccpPacket(PacketType.DATA, 1, 2, 3, options=(CcidOption(5, b""),)),
        DccpPacket(PacketType.DATA, 1, 2, 3, options=(UnknownOption(7, b"x"),)),
    ]:
        with pytest.raises(DccpEncodeError):
            encode(p, *a)


# --- checksum and CsCov ------------------------------------------------------------------------


def test_checksum_matches_plain_rfc1071() -> None:
    p = DccpPacket(PacketType.DATA, 5, 6, 7, payload=b"odd length!")
    wire = encode(p, "10.1.2.3", "10.3.2.1")
    zeroed = wire[:6] + b"\x00\x00" + wire[8:]
    ph = pseudo_header("10.1.2.3", "10.3.2.1", len(wire))
    assert internet_checksum(ph + zeroed) == (wire[6] << 8) | wire[7]
    ph6 = pseudo_header("fd77::1", "fd77::2", len(wire))
    assert len(ph6) == 40 and ph6[-1] == 33
    assert internet_checksum(ph6 + zeroed) == compute_checksum(wire, "fd77::1", "fd77::2")


@FAST
@given(
    st.binary(min_size=1, max_size=60),
    st.integers(1, 15),
    ADDRS,
    st.sampled_from([PacketType.DATA, PacketType.DATAACK]),
    st.data(),
)
def test_cscov_coverage(
    payload: bytes, cscov: int, addrs: tuple[str, str], t: PacketType, data: st.DataObject
) -> None:
    covered = (cscov - 1) * 4
    assume(covered <= len(payload))
    p = DccpPacket(t, 1, 2, 3, ack=9 if t == PacketType.DATAACK else None, cscov=cscov,
                   options=(ElapsedTime(5),), payload=payload)  # fmt: skip
    wire = bytearray(encode(p, *addrs))
    hlen = wire[4] * 4
    assert check(bytes(wire), *addrs)
    flip = data.draw(st.integers(1, 255))
    if covered < len(payload):
        # Corrupting application data outside the coverage keeps the checksum valid.
        i = data.draw(st.integers(hlen + covered, len(wire) - 1))
        uncovered = bytearray(wire)
        uncovered[i] ^= flip
        assert check(bytes(uncovered), *addrs)
        assert decode(bytes(uncovered), *addrs).payload != payload
    # Corrupting anything covered (header after the checksum field, options, covered data) fails.
    j = data.draw(st.integers(8, hlen + covered - 1))
    wire[j] ^= flip
    assert not check(bytes(wire), *addrs)
    with pytest.raises(DccpParseError):
        decode(bytes(wire), *addrs)


def test_cscov_past_packet_is_rejected() -> None:
    wire = bytearray(encode(DccpPacket(PacketType.DATA, 1, 2, 3, payload=b"12345678"), None, None))
    wire[5] = 3  # covers 8 payload bytes: fine
    decode(bytes(wire), verify=False)
    wire[5] = 4  # covers 12: past the end
    with pytest.raises(DccpParseError, match="CsCov"):
        decode(bytes(wire), verify=False)


def test_no_checksum_mode_leaves_zero() -> None:
    wire = encode(DccpPacket(PacketType.DATA, 1, 2, 3, payload=b"x"), None, None)
    assert wire[6:8] == b"\x00\x00"
    with pytest.raises(DccpEncodeError):
        encode(DccpPacket(PacketType.DATA, 1, 2, 3), "10.0.0.1", None)


# --- fast path ---------------------------------------------------------------------------------


@FAST
@given(
    st.integers(0, (1 << 48) - 1),
    st.none() | st.integers(0, (1 << 48) - 1),
    st.lists(options_st, max_size=4),
    st.binary(max_size=100),
    st.integers(0, 15),
    ADDRS,
    st.integers(0, 16),
)
def test_encode_data_into_matches_encode(
    seq: int, ack: int | None, opts: list[Option], payload: bytes, ccval: int,
    addrs: tuple[str, str], offset: int,
) -> None:  # fmt: skip
    t = PacketType.DATA if ack is None else PacketType.DATAACK
    p = DccpPacket(t, 4000, 5001, seq, ack=ack, ccval=ccval, options=tuple(opts), payload=payload)
    expected = encode(p, *addrs)
    raw_opts = encode_options(opts)
    buf = bytearray(b"\xee" * (offset + len(expected) + 5))
    n = encode_data_into(
        buf, offset, sport=4000, dport=5001, seq=seq, ack=ack, payload=payload,
        options=raw_opts, ccval=ccval, src_ip=addrs[0], dst_ip=addrs[1],
    )  # fmt: skip
    assert n == len(expected)
    assert bytes(buf[offset : offset + n]) == expected
    assert buf[:offset] == b"\xee" * offset and buf[offset + n :] == b"\xee" * 5
    assert encode_data(
        sport=4000, dport=5001, seq=seq, ack=ack, payload=payload, options=raw_opts,
        ccval=ccval, src_ip=addrs[0], dst_ip=addrs[1],
    ) == expected  # fmt: skip


def test_encode_data_into_checks_room() -> None:
    with pytest.raises(DccpEncodeError, match="too small"):
        encode_data_into(bytearray(10), 0, sport=1, dport=2, seq=3, payload=b"")
    with pytest.raises(DccpEncodeError, match="16-bit"):
        encode_data_into(bytearray(64), 0, sport=1, dport=70000, seq=3, payload=b"")
    with pytest.raises(DccpEncodeError, match="multiple of 4"):
        encode_data_into(bytearray(64), 0, sport=1, dport=2, seq=3, payload=b"", options=b"\x00")


# --- DCCP-UDP (RFC 6773) -------------------------------------------------------------------------


def _ones_complement_checksum(data: bytes) -> int:
    """RFC 1071, word by word (independent of the codec's int.from_bytes trick)."""
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _udp_checksum(src: str, dst: str, udp: bytes) -> int:
    """The UDP checksum of ``udp`` (its checksum field zero) over the IPv4/IPv6 pseudo-header."""
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    if len(s) == 4:
        pseudo = s + d + bytes((0, 17)) + len(udp).to_bytes(2, "big")
    else:
        pseudo = s + d + len(udp).to_bytes(4, "big") + b"\x00\x00\x00\x11"
    c = _ones_complement_checksum(pseudo + udp)
    return c or 0xFFFF  # RFC 768: a computed zero is sent as all ones


def _rfc6773_request(src: str, dst: str, *, dccp_checksum: int = 0) -> bytes:
    """A DCCP-Request as DCCP-UDP, assembled field by field from RFC 6773's figures.

    §3: UDP header, then the DCCP generic header (§3.2, X=1) with its *own* ports, then
    the type-specific Service Code, no options, no data. UDP ports 40000 -> 7001 (where the
    ends listen, §3.1), DCCP ports 5555 -> 5001 (the connection's, §3.2). DCCP Checksum 0
    (§3.3), UDP checksum over the whole datagram.
    """
    dccp = struct.pack(
        "!HHBBH",
        5555, 5001,  # DCCP Source Port, Dest Port
        5,  # Data Offset: 16-byte generic header + 4-byte Service Code = 5 words
        (0 << 4) | 0,  # CCVal 0, CsCov 0
        dccp_checksum,  # the DCCP Checksum: zero on transmit (RFC 6773 §3.3)
    ) + struct.pack(
        "!BB", (PacketType.REQUEST << 1) | 1, 0  # Res 0, Type 0 (Request), X=1; Reserved
    ) + (0x0000_0102_0304).to_bytes(6, "big") + struct.pack(  # 48-bit Sequence Number
        "!I", 0x44434350  # Service Code "DCCP"
    )  # fmt: skip
    udp = struct.pack("!HHHH", 40000, 7001, 8 + len(dccp), 0) + dccp
    csum = _udp_checksum(src, dst, udp)
    return udp[:6] + csum.to_bytes(2, "big") + udp[8:]


@pytest.mark.parametrize("addrs", [("10.0.0.1", "10.0.0.2"), ("fd77::1", "fd77::2")])
def test_rfc6773_hand_built_vector(addrs: tuple[str, str]) -> None:
    dgram = _rfc6773_request(*addrs)
    assert len(dgram) == 8 + 20 and dgram[6:8] != b"\x00\x00"
    u = decap_udp(dgram, *addrs)
    assert (u.sport, u.dport) == (40000, 7001)
    assert u.dccp == dgram[8:]  # the whole DCCP packet, its ports included
    got = decode_udp(dgram, *addrs)
    assert (got.udp_sport, got.udp_dport) == (40000, 7001)
    assert got.packet == DccpPacket(
        PacketType.REQUEST, 5555, 5001, 0x0102_0304, service_code=0x44434350
    )
    # The codec builds exactly these bytes from the same packet and UDP ports.
    assert encode_udp(got.packet, *addrs, 40000, 7001) == dgram
    # With a native checksum, the same DCCP bytes would not be valid DCCP (field zero):
    assert not check(u.dccp, *addrs)


def test_rfc6773_dccp_checksum_field_ignored() -> None:
    src, dst = "10.0.0.1", "10.0.0.2"
    dgram = _rfc6773_request(src, dst, dccp_checksum=0xBEEF)  # nonsense, UDP checksum valid
    got = decode_udp(dgram, src, dst)
    assert got.packet == decode_udp(_rfc6773_request(src, dst), src, dst).packet
    # decode_udp verifies nothing in the DCCP field; the plain codec still would
    with pytest.raises(DccpChecksumError):
        decode(dgram[8:], src, dst)


def test_rfc6773_zero_udp_checksum_dropped() -> None:
    src, dst = "10.0.0.1", "10.0.0.2"
    dgram = bytearray(_rfc6773_request(src, dst))
    dgram[6:8] = b"\x00\x00"  # "no checksum" is legal UDP over IPv4, not DCCP-UDP
    for addrs in ((src, dst), (None, None)):
        with pytest.raises(DccpParseError, match="checksum is zero"):
            decap_udp(bytes(dgram), *addrs)


def test_rfc6773_bad_udp_checksum_dropped() -> None:
    src, dst = "fd77::1", "fd77::2"
    dgram = bytearray(_rfc6773_request(src, dst))
    dgram[-1] ^= 0x40  # the Service Code: covered by the UDP checksum
    with pytest.raises(DccpChecksumError):
        decode_udp(bytes(dgram), src, dst)
    # the addresses are part of it too (pseudo-header)
    with pytest.raises(DccpChecksumError):
        decode_udp(_rfc6773_request(src, dst), src, "fd77::3")


def _with_udp_length(dgram: bytes, ulen: int, src: str, dst: str) -> bytes:
    """``dgram`` with UDP Length ``ulen`` and a UDP checksum that is right for it."""
    head = dgram[:4] + ulen.to_bytes(2, "big") + b"\x00\x00"
    covered = (head + dgram[8:])[:ulen] if ulen >= 8 else head
    csum = _udp_checksum(src, dst, covered)
    return head[:6] + csum.to_bytes(2, "big") + dgram[8:]


def test_rfc6773_length_rules() -> None:
    src, dst = "10.0.0.1", "10.0.0.2"
    good = _rfc6773_request(src, dst)  # UDP Length 28: 8 + 20-byte DCCP header
    # UDP Length below 20 (8 + the smallest DCCP generic header)
    with pytest.raises(DccpParseError, match="< 20"):
        decap_udp(_with_udp_length(good, 19, src, dst), src, dst)
    with pytest.raises(DccpParseError, match="< 20"):
        decap_udp(_with_udp_length(good, 19, src, dst)[:19])
    with pytest.raises(DccpParseError, match="too short"):
        decap_udp(good[:7])
    # UDP Length longer than the datagram
    with pytest.raises(DccpParseError, match="> the 28-byte"):
        decap_udp(_with_udp_length(good, 29, src, dst), src, dst)
    with pytest.raises(DccpParseError, match="> the 27-byte"):
        decap_udp(good[:-1], src, dst)
    # UDP Length >= 20 but shorter than UDP header + the whole DCCP header (Data Offset 5)
    short = _with_udp_length(good, 24, src, dst)
    with pytest.raises(DccpParseError, match="20-byte DCCP header"):
        decap_udp(short, src, dst)
    # the same rule on a payload a UDP socket delivered (the kernel checked the rest)
    check_udp_payload(good[8:])
    with pytest.raises(DccpParseError, match="< 20"):
        check_udp_payload(good[8:19])
    with pytest.raises(DccpParseError, match="DCCP header"):
        check_udp_payload(good[8:24])
    # An options area counts as header: Data Offset 6 on a 20-byte DCCP packet
    bumped = bytearray(good)
    bumped[12] = 6
    with pytest.raises(DccpParseError, match="24-byte DCCP header"):
        decap_udp(_with_udp_length(bytes(bumped), 28, src, dst), src, dst)
    # Bytes after UDP Length are not part of the datagram (as in any UDP)
    assert decap_udp(good + b"\xff\xff", src, dst) == decap_udp(good, src, dst)


def test_rfc6773_data_with_short_sequence_numbers() -> None:
    # The smallest DCCP-UDP datagram: UDP header + 12-byte X=0 Data header = 20 bytes.
    src, dst = "192.0.2.1", "198.51.100.2"
    pkt = DccpPacket(PacketType.DATA, 1, 2, 0xABCDEF, x=False)
    dgram = encode_udp(pkt, src, dst, 6511, 6511)
    assert len(dgram) == DCCP_UDP_MIN_LEN == 20
    assert decode_udp(dgram, src, dst).packet == pkt


def test_encap_udp_rejects_impossible_input() -> None:
    wire = encode(DccpPacket(PacketType.DATA, 1, 2, 3), None, None)
    with pytest.raises(DccpEncodeError, match="UDP ports"):
        encap_udp(wire, "10.0.0.1", "10.0.0.2", 70000, 1)
    with pytest.raises(DccpEncodeError, match="shorter"):
        encap_udp(wire[:10], "10.0.0.1", "10.0.0.2", 1, 1)
    with pytest.raises(DccpEncodeError, match="too long"):
        encap_udp(wire + bytes(65535), "10.0.0.1", "10.0.0.2", 1, 1)


@FAST
@given(packets(), ADDRS, st.integers(1, 0xFFFF), st.integers(1, 0xFFFF))
def test_udp_encapsulation_round_trip(
    pkt: DccpPacket, addrs: tuple[str, str], usport: int, udport: int
) -> None:
    dgram = encode_udp(pkt, *addrs, usport, udport)
    native = encode(pkt, *addrs)
    # UDP header inserted in front of the whole DCCP packet (RFC 6773 §3)
    assert struct.unpack_from("!HHH", dgram, 0) == (usport, udport, len(native) + 8)
    assert dgram[8:12] == native[0:4]  # the DCCP ports stay in the DCCP header
    assert dgram[14:16] == b"\x00\x00"  # DCCP Checksum zero on transmit (§3.3)
    assert dgram[8:14] == native[0:6] and dgram[16:] == native[8:]
    assert dgram[6:8] != b"\x00\x00"
    assert int.from_bytes(dgram[6:8], "big") == _udp_checksum(
        *addrs, dgram[:6] + b"\0\0" + dgram[8:]
    )
    # a full IP packet around it passes the analysis module's (independent) UDP check
    ip = (build_ipv4 if ":" not in addrs[0] else build_ipv6)(addrs[0], addrs[1], 17, dgram)
    assert verify_l4_checksum(ip)
    got = decode_udp(dgram, *addrs)
    assert (got.udp_sport, got.udp_dport) == (usport, udport)
    assert unpadded(got.packet) == pkt
    # raw bytes in, raw bytes out
    assert encap_udp(decap_udp(dgram, *addrs).dccp, *addrs, usport, udport) == dgram


@FAST
@given(packets(), ADDRS, st.lists(st.tuples(st.integers(0, 10_000), u8), min_size=1, max_size=4))
def test_mutated_udp_datagrams_only_parse_errors(
    pkt: DccpPacket, addrs: tuple[str, str], flips: list[tuple[int, int]]
) -> None:
    dgram = bytearray(encode_udp(pkt, *addrs, 40000, 7001))
    for pos, val in flips:
        dgram[pos % len(dgram)] = val
    for a in (addrs, (None, None)):
        try:
            got = decode_udp(bytes(dgram), *a)
        except DccpParseError as e:
            assert e.reason
        else:
            assert isinstance(got.packet.type, PacketType)
            assert len(dgram) >= 20


def test_option_error_carries_reset_data_and_header() -> None:
    # An Ack whose Timestamp option has length 5: Linux answers Reset 5 (Option Error).
    good = encode(
        DccpPacket(PacketType.ACK, 7, 8, 100, ack=50, options=(Timestamp(0x01020304),)), None, None
    )
    bad = bytearray(good)
    i = bad.index(b"\x29\x06")
    bad[i + 1] = 5
    with pytest.raises(DccpOptionError) as ei:
        decode(bytes(bad), verify=False)
    err = ei.value
    assert err.option_type == 41 and err.reset_data == b"\x29\x01\x02"
    assert err.packet is not None
    assert (err.packet.type, err.packet.seq, err.packet.ack) == (PacketType.ACK, 100, 50)
    assert err.packet.options == ()
    assert isinstance(err, DccpParseError)  # still counted and dropped by plain callers
    with pytest.raises(DccpOptionError) as e2:
        decode_options(b"\x2b")
    assert e2.value.reset_data == b"\x2b\x00\x00"


@FAST
@given(packets(), ADDRS, st.lists(st.tuples(st.integers(0, 10_000), u8), min_size=1, max_size=4))
def test_mutated_packets_only_parse_errors(
    pkt: DccpPacket, addrs: tuple[str, str], flips: list[tuple[int, int]]
) -> None:
    wire = bytearray(encode(pkt, *addrs))
    for pos, val in flips:
        wire[pos % len(wire)] = val
    for verify in (False, True):
        try:
            got = decode(bytes(wire), *addrs, verify=verify)
        except DccpParseError as e:
            assert e.reason
        else:
            assert isinstance(got.type, PacketType)
