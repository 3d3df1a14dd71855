"""Packet codec: known vectors (hand-built bytes, dpkt as an independent codec), extension
headers, fragments, length checks, checksums."""

from __future__ import annotations

import ipaddress
import struct

import dpkt
import pytest

from vstack.analysis.packet import (
    ICMP,
    ICMPV6,
    TCP,
    UDP,
    UDPLITE,
    ICMPHeader,
    ParseError,
    TCPHeader,
    UDPHeader,
    UDPTemplate,
    build_icmp_echo,
    build_ipv4,
    build_ipv6,
    build_tcp,
    build_udp,
    checksum_add,
    internet_checksum,
    parse,
    pseudo_header,
    tcp_flags_str,
    tcp_flags_value,
    verify_ip_checksum,
    verify_l4_checksum,
)


def naive_checksum(data: bytes) -> int:
    """RFC 1071 s4.1, word by word (the reference the fast version is checked against)."""
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += data[i] << 8 | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


# ----------------------------------------------------------------------------- checksums

def test_ipv4_header_checksum_known_vector() -> None:
    # The classic example header (Wikipedia "IPv4 header checksum"): checksum 0xB861.
    hdr = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert internet_checksum(hdr) == 0xB861
    fixed = hdr[:10] + b"\xb8\x61" + hdr[12:]
    assert internet_checksum(fixed) == 0


def test_rfc1071_example_sum() -> None:
    # RFC 1071 s3: the words 0001 f203 f4f5 f6f7 sum to 0xddf2 (ones' complement).
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert checksum_add(data) == 0xDDF2
    assert internet_checksum(data) == ~0xDDF2 & 0xFFFF


@pytest.mark.parametrize("data", [b"", b"\0", b"\0\0\0", b"\xff", b"\xff\xff", b"\xff\xff" * 7,
                                  b"\x01", b"\x12\x34\x56", bytes(range(256)) * 6])
def test_checksum_matches_naive(data: bytes) -> None:
    assert internet_checksum(data) == naive_checksum(data)


def test_pseudo_headers() -> None:
    assert pseudo_header("10.0.0.1", "10.0.0.2", 17, 30) == (
        bytes([10, 0, 0, 1, 10, 0, 0, 2, 0, 17, 0, 30]))
    p6 = pseudo_header("fd00::1", "fd00::2", 58, 70000)
    assert len(p6) == 40
    assert p6[32:] == (70000).to_bytes(4, "big") + b"\0\0\0\x3a"
    with pytest.raises(ValueError):
        pseudo_header("10.0.0.1", "fd00::2", 17, 8)


# ----------------------------------------------------------------------------- known vectors

def test_hand_built_ipv4_udp() -> None:
    payload = b"hi"
    udp = struct.pack("!HHHH", 5000, 53, 10, 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0xB8, 30, 0x1234, 0x4000, 17, 17, 0,
                     bytes([192, 0, 2, 1]), bytes([198, 51, 100, 7])) + udp
    p = parse(ip)
    assert (p.version, p.src, p.dst, p.proto) == (4, "192.0.2.1", "198.51.100.7", UDP)
    assert (p.dscp, p.ecn, p.ttl, p.total_len, p.header_len) == (46, 0, 17, 30, 20)
    assert p.l4 == UDPHeader(5000, 53, 10, 0)
    assert (p.payload_offset, p.payload_len, p.fragment, p.ident) == (28, 2, False, 0x1234)
    assert p.payload(ip) == b"hi"
    assert not verify_ip_checksum(ip)  # checksum left 0
    assert verify_l4_checksum(ip)  # UDP checksum 0 = not computed (RFC 768)


def test_build_udp_agrees_with_dpkt() -> None:
    pkt = build_udp("10.1.2.3", "10.9.8.7", 40000, 9000, b"payload!", dscp=10, ttl=33)
    ip = dpkt.ip.IP(pkt)
    assert ip.tos == 10 << 2 and ip.ttl == 33 and ip.p == 17
    assert ip.udp.sport == 40000 and ip.udp.dport == 9000 and ip.udp.data == b"payload!"
    want_ip, want_udp = ip.sum, ip.udp.sum
    ip.sum = 0
    ip.udp.sum = 0
    again = dpkt.ip.IP(bytes(ip))  # dpkt recomputes both checksums on pack
    assert (again.sum, again.udp.sum) == (want_ip, want_udp)
    assert verify_ip_checksum(pkt) and verify_l4_checksum(pkt)


def test_build_udp6_agrees_with_dpkt() -> None:
    pkt = build_udp("fd00::1", "fd01::2", 1, 2, b"x" * 33)
    ip6 = dpkt.ip6.IP6(pkt)
    want = ip6.udp.sum
    u = dpkt.udp.UDP(sport=1, dport=2, ulen=41, data=b"x" * 33)
    ref = dpkt.ip6.IP6(src=ip6.src, dst=ip6.dst, nxt=17, hlim=64, data=u, plen=41)
    assert dpkt.ip6.IP6(bytes(ref)).udp.sum == want
    assert verify_l4_checksum(pkt)


def test_dpkt_built_tcp_parses() -> None:
    tcp = dpkt.tcp.TCP(sport=443, dport=51000, seq=7, ack=9,
                       flags=dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK, win=1000, data=b"abc")
    ip = dpkt.ip.IP(src=bytes([10, 0, 0, 1]), dst=bytes([10, 0, 0, 2]), p=6, data=tcp, ttl=5)
    raw = bytes(ip)
    p = parse(raw)
    assert isinstance(p.l4, TCPHeader)
    assert (p.l4.sport, p.l4.dport, p.l4.seq, p.l4.ack, p.l4.window) == (443, 51000, 7, 9, 1000)
    assert p.l4.flags_str == "SA" and p.l4.header_len == 20
    assert p.payload(raw) == b"abc"
    assert verify_l4_checksum(raw)


@pytest.mark.parametrize(("flags", "text"), [(0x02, "S"), (0x12, "SA"), (0x11, "FA"), (0x18, "PA"),
                                             (0x04, "R"), (0x00, ""), (0xFF, "FSRPAUEC")])
def test_tcp_flags(flags: int, text: str) -> None:
    assert tcp_flags_str(flags) == text
    assert tcp_flags_value(text) == flags
    pkt = build_tcp("fd00::1", "fd00::2", 1, 2, flags=text)
    l4 = parse(pkt).l4
    assert isinstance(l4, TCPHeader) and l4.flags == flags
    with pytest.raises(ValueError):
        tcp_flags_value("SX")


def test_tcp_options_and_data_offset() -> None:
    mss = b"\x02\x04\x05\xb4"
    pkt = build_tcp("10.0.0.1", "10.0.0.2", 1, 2, b"data", options=mss + b"\x01")
    p = parse(pkt)
    assert isinstance(p.l4, TCPHeader) and p.l4.header_len == 28
    assert p.payload_offset == 48 and p.payload(pkt) == b"data"
    assert verify_l4_checksum(pkt)


def test_icmp_echo_v4() -> None:
    pkt = build_icmp_echo("10.0.0.1", "10.0.0.2", 0xBEEF, 3, b"ping")
    ip = dpkt.ip.IP(pkt)
    assert ip.icmp.type == 8 and ip.icmp.echo.id == 0xBEEF and ip.icmp.echo.seq == 3
    want = ip.icmp.sum
    ip.icmp.sum = 0
    assert dpkt.icmp.ICMP(bytes(ip.icmp)).sum == want
    p = parse(pkt)
    assert p.proto == ICMP and p.l4 == ICMPHeader(8, 0, want, 0xBEEF, 3)
    assert p.payload(pkt) == b"ping" and verify_l4_checksum(pkt)
    reply = parse(build_icmp_echo("10.0.0.2", "10.0.0.1", 0xBEEF, 3, b"ping", reply=True))
    assert isinstance(reply.l4, ICMPHeader) and reply.l4.type == 0 and reply.l4.ident == 0xBEEF


def test_icmp_echo_v6() -> None:
    pkt = build_icmp_echo("fd00::1", "fd00::2", 77, 1, b"x" * 56)
    p = parse(pkt)
    assert p.proto == ICMPV6 and isinstance(p.l4, ICMPHeader)
    assert (p.l4.type, p.l4.code, p.l4.ident, p.l4.seq) == (128, 0, 77, 1)
    assert verify_l4_checksum(pkt)
    # same checksum as dpkt's ICMPv6 (which uses the IPv6 pseudo header)
    ip6 = dpkt.ip6.IP6(pkt)
    want = ip6.icmp6.sum
    ip6.icmp6.sum = 0
    assert dpkt.ip6.IP6(bytes(ip6)).icmp6.sum == want == p.l4.checksum


def test_icmp_non_echo_has_no_ident() -> None:
    body = struct.pack("!BBHI", 3, 1, 0, 0) + b"\x45" + b"\0" * 27
    body = body[:2] + internet_checksum(body).to_bytes(2, "big") + body[4:]
    p = parse(build_ipv4("10.0.0.1", "10.0.0.2", ICMP, body))
    assert isinstance(p.l4, ICMPHeader) and (p.l4.type, p.l4.code) == (3, 1)
    assert p.l4.ident is None and not p.l4.is_echo and p.sport == 0


def test_ipv4_options_skipped() -> None:
    udp = build_udp("10.0.0.1", "10.0.0.2", 7, 8, b"opt")[20:]
    pkt = build_ipv4("10.0.0.1", "10.0.0.2", UDP, udp, options=b"\x94\x04\x00\x00")  # router alert
    p = parse(pkt)
    assert p.header_len == 24 and isinstance(p.l4, UDPHeader) and p.l4.dport == 8
    assert p.payload(pkt) == b"opt"
    assert verify_ip_checksum(pkt) and verify_l4_checksum(pkt)


def test_trailing_bytes_ignored() -> None:
    pkt = build_udp("10.0.0.1", "10.0.0.2", 7, 8, b"abc")
    p = parse(pkt + b"\0" * 10)  # e.g. Ethernet padding
    assert p.total_len == len(pkt) and p.payload_len == 3


def test_udp_lite() -> None:
    seg = struct.pack("!HHHH", 1, 2, 8, 0) + b"body"
    p = parse(build_ipv4("10.0.0.1", "10.0.0.2", UDPLITE, seg))
    assert p.proto == UDPLITE and isinstance(p.l4, UDPHeader) and p.payload_len == 4
    bad = struct.pack("!HHHH", 1, 2, 99, 0) + b"body"
    with pytest.raises(ParseError, match="coverage"):
        parse(build_ipv4("10.0.0.1", "10.0.0.2", UDPLITE, bad))


def test_unknown_protocol_has_no_l4() -> None:
    p = parse(build_ipv4("10.0.0.1", "10.0.0.2", 47, b"\0" * 12))  # GRE
    assert p.proto == 47 and p.l4 is None and p.payload_offset == 20 and p.payload_len == 12


# ----------------------------------------------------------------------------- IPv6 ext headers

def _ext(nh: int, body_len_units: int, fill: bytes = b"") -> bytes:
    """A generic 8-octet-unit extension header: next header, length, then padding."""
    size = (body_len_units + 1) * 8
    return bytes([nh, body_len_units]) + fill.ljust(size - 2, b"\0")


def test_ipv6_extension_chain() -> None:
    udp = build_udp("fd00::1", "fd00::2", 1000, 2000, b"deep")[40:]
    # hop-by-hop -> routing (type 4 SRH-ish, one 16-byte address) -> dest opts -> AH -> UDP
    hbh = _ext(43, 0, b"\x01\x04\0\0\0\0")  # PadN
    rh = bytes([60, 2, 4, 0, 0, 0, 0, 0]) + bytes(16)
    dst = _ext(51, 1)
    ah = bytes([17, 4]) + bytes(2) + bytes(4) + bytes(4) + bytes(12)  # (4+2)*4 = 24 bytes
    payload = hbh + rh + dst + ah + udp
    pkt = build_ipv6("fd00::1", "fd00::2", 0, payload, dscp=8, ecn=1, flow_label=0xABCDE)
    p = parse(pkt)
    assert p.version == 6 and p.proto == UDP
    assert p.header_len == 40 + 8 + 24 + 16 + 24
    assert (p.dscp, p.ecn, p.flow_label, p.ttl) == (8, 1, 0xABCDE, 64)
    assert isinstance(p.l4, UDPHeader) and (p.l4.sport, p.l4.dport) == (1000, 2000)
    assert p.payload(pkt) == b"deep" and not p.fragment
    assert verify_l4_checksum(pkt)  # pseudo header uses the final next header and UDP length


def test_ipv6_esp_and_no_next_header_stop() -> None:
    esp = parse(build_ipv6("fd00::1", "fd00::2", 60, _ext(50, 0) + b"\x00\x00\x01\x00" * 4))
    assert esp.proto == 50 and esp.l4 is None and esp.header_len == 48
    none = parse(build_ipv6("fd00::1", "fd00::2", 0, _ext(59, 0) + b"junk"))
    assert none.proto == 59 and none.l4 is None and none.payload_len == 4


def test_ipv6_fragments() -> None:
    udp = build_udp("fd00::1", "fd00::2", 5, 6, b"a" * 100)[40:]
    first = bytes([17, 0]) + struct.pack("!HI", 0 | 1, 0xCAFE) + udp[:56]
    p = parse(build_ipv6("fd00::1", "fd00::2", 44, first))
    assert p.fragment and p.more_fragments and p.frag_offset == 0 and p.ident == 0xCAFE
    assert isinstance(p.l4, UDPHeader) and p.l4.length == 108  # of the whole datagram
    assert p.proto == UDP
    rest = bytes([17, 0]) + struct.pack("!HI", 56, 0xCAFE) + udp[56:]
    q = parse(build_ipv6("fd00::1", "fd00::2", 44, rest))
    assert q.fragment and not q.more_fragments and q.frag_offset == 56
    assert q.l4 is None and q.payload_offset == 48 and q.payload_len == len(udp) - 56
    with pytest.raises(ParseError):
        verify_l4_checksum(build_ipv6("fd00::1", "fd00::2", 44, first))
    twice = bytes([44, 0]) + struct.pack("!HI", 1, 1) + first
    with pytest.raises(ParseError, match="two fragment"):
        parse(build_ipv6("fd00::1", "fd00::2", 44, twice))


def test_ipv4_fragments() -> None:
    udp = build_udp("10.0.0.1", "10.0.0.2", 5, 6, b"b" * 100)[20:]
    first = build_ipv4("10.0.0.1", "10.0.0.2", UDP, udp[:64], mf=True, ident=9)
    p = parse(first)
    assert p.fragment and p.more_fragments and isinstance(p.l4, UDPHeader)
    assert p.l4.length == 108 and p.payload_len == 56
    second = build_ipv4("10.0.0.1", "10.0.0.2", UDP, udp[64:], frag_offset=64, ident=9)
    q = parse(second)
    assert q.fragment and q.frag_offset == 64 and q.l4 is None and q.payload_len == 44
    tiny = parse(build_ipv4("10.0.0.1", "10.0.0.2", TCP, b"\0" * 8, mf=True))
    assert tiny.fragment and tiny.l4 is None  # first fragment too short for a TCP header


def test_ipv6_address_text_is_canonical() -> None:
    for a in ("::102:304", "::ffff:1.2.3.4", "2001:db8::1", "fe80::1:0:0:1", "::1"):
        pkt = build_udp(a, "fd00::2", 1, 2)
        assert parse(pkt).src == str(ipaddress.IPv6Address(a))


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize(("raw", "reason"), [
    (b"", "empty"),
    (b"\x50" + bytes(30), "version 5"),
    (b"\x45" + bytes(10), "truncated"),
    (b"\x44" + bytes(19), "header length 16"),
    (bytes.fromhex("4500000a") + bytes(16), "total length 10 < header"),
    (bytes.fromhex("450000ff") + bytes(16), "total length 255 > buffer"),
    (b"\x60" + bytes(20), "IPv6 header truncated"),
    (b"\x60\0\0\0\0\0\x11\x40" + bytes(32), "jumbogram"),
])
def test_parse_errors(raw: bytes, reason: str) -> None:
    with pytest.raises(ParseError, match=reason):
        parse(raw)


def test_udp_length_checked() -> None:
    good = bytearray(build_udp("10.0.0.1", "10.0.0.2", 1, 2, b"abcd"))
    good[24:26] = (7).to_bytes(2, "big")
    with pytest.raises(ParseError, match="UDP length 7 < 8"):
        parse(bytes(good))
    good[24:26] = (13).to_bytes(2, "big")
    with pytest.raises(ParseError, match="UDP length 13 > IP payload 12"):
        parse(bytes(good))
    good[24:26] = (10).to_bytes(2, "big")  # shorter than the IP payload: trailing bytes ignored
    assert parse(bytes(good)).payload_len == 2


def test_tcp_data_offset_checked() -> None:
    pkt = bytearray(build_tcp("10.0.0.1", "10.0.0.2", 1, 2, b"xy"))
    pkt[32] = 0x40  # 16 bytes
    with pytest.raises(ParseError, match="data offset 16"):
        parse(bytes(pkt))
    pkt[32] = 0xF0  # 60 bytes > 22
    with pytest.raises(ParseError, match="data offset 60"):
        parse(bytes(pkt))


def test_corrupted_checksums_detected() -> None:
    for pkt in (build_udp("10.0.0.1", "10.0.0.2", 1, 2, b"abcd"),
                build_udp("fd00::1", "fd00::2", 1, 2, b"abcd"),
                build_tcp("fd00::1", "fd00::2", 1, 2, b"abcd"),
                build_icmp_echo("10.0.0.1", "10.0.0.2", 1, 2, b"abcd"),
                build_icmp_echo("fd00::1", "fd00::2", 1, 2, b"abcd")):
        assert verify_l4_checksum(pkt)
        bad = bytearray(pkt)
        bad[-1] ^= 0x40
        assert not verify_l4_checksum(bytes(bad))
    with pytest.raises(ParseError):
        verify_l4_checksum(build_ipv4("10.0.0.1", "10.0.0.2", 47, b"\0" * 4))


def test_builders_reject_bad_input() -> None:
    with pytest.raises(ValueError):
        build_udp("10.0.0.1", "fd00::1", 1, 2)
    with pytest.raises(ValueError):
        build_udp("10.0.0.300", "10.0.0.1", 1, 2)
    with pytest.raises(ValueError):
        build_udp("10.0.0.1", "10.0.0.2", 70000, 2)
    with pytest.raises(ValueError):
        build_udp("10.0.0.1", "10.0.0.2", 1, 2, b"\0" * 65530)
    with pytest.raises(ValueError):
        UDPTemplate("10.0.0.1", "10.0.0.2", 1, 2).build(b"\0" * 65510)


def test_udp_template_matches_builder() -> None:
    for src, dst in (("10.0.0.2", "10.0.0.1"), ("fd00::2", "fd00::1")):
        t = UDPTemplate(src, dst, 9000, 40000, dscp=4, ttl=60)
        for payload in (b"", b"a", b"hello world", bytes(1472), b"\xff" * 1473):
            assert t.build(payload) == build_udp(src, dst, 9000, 40000, payload, dscp=4, ttl=60)


def test_fast_constructor_builds_equal_frozen_instances() -> None:
    import dataclasses

    from vstack.analysis.packet import fast_constructor

    args = (4, "10.0.0.1", "10.0.0.2", 17, 0, 0, 64, 30, 20, UDPHeader(1, 2, 10, 0), 28, 2,
            False, 0, False, 7, 0)
    from vstack.analysis.packet import IPPacket

    fast = fast_constructor(IPPacket)(*args)
    assert fast == IPPacket(*args) and hash(fast) == hash(IPPacket(*args))
    assert repr(fast) == repr(IPPacket(*args))
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.ttl = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        fast_constructor(UDPHeader)(1, 2, 3)  # every field is required
