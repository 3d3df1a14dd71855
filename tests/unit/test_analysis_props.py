"""Hypothesis properties of the packet codec and the classifier: build -> parse round-trips,
and random, truncated or mutated bytes never raise anything but ParseError."""

from __future__ import annotations

import contextlib
import ipaddress

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vstack.analysis.classifier import Direction, classify, flow_key, reverse, wire_key
from vstack.analysis.packet import (
    ICMPHeader,
    ParseError,
    TCPHeader,
    UDPHeader,
    UDPTemplate,
    build_icmp_echo,
    build_tcp,
    build_udp,
    checksum_add,
    internet_checksum,
    parse,
    verify_ip_checksum,
    verify_l4_checksum,
)

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

v4 = st.builds(lambda i: str(ipaddress.IPv4Address(i)), st.integers(0, 2**32 - 1))
v6 = st.builds(lambda i: str(ipaddress.IPv6Address(i)), st.integers(0, 2**128 - 1))
pair = st.one_of(st.tuples(v4, v4), st.tuples(v6, v6))
port = st.integers(0, 0xFFFF)
payload = st.binary(max_size=1500)
dscp = st.integers(0, 63)
ttl = st.integers(0, 255)


def _naive(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(data[i] << 8 | data[i + 1] for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


@SETTINGS
@given(st.binary(max_size=3000))
def test_checksum_equals_reference(data: bytes) -> None:
    assert internet_checksum(data) == _naive(data)


@SETTINGS
@given(st.binary(max_size=200), st.binary(max_size=200))
def test_checksum_pieces_combine(a: bytes, b: bytes) -> None:
    if len(a) % 2:
        a += b"\0"
    assert internet_checksum(b, checksum_add(a)) == internet_checksum(a + b)


@SETTINGS
@given(pair, port, port, payload, dscp, ttl)
def test_udp_round_trip(addrs: tuple[str, str], sport: int, dport: int, data: bytes, ds: int,
                        hl: int) -> None:
    src, dst = addrs
    pkt = build_udp(src, dst, sport, dport, data, dscp=ds, ttl=hl)
    p = parse(pkt)
    assert (p.src, p.dst, p.proto, p.dscp, p.ttl) == (src, dst, 17, ds, hl)
    assert p.version == (6 if ":" in src else 4)
    assert isinstance(p.l4, UDPHeader) and (p.l4.sport, p.l4.dport) == (sport, dport)
    assert p.total_len == len(pkt) and p.payload(pkt) == data and not p.fragment
    assert verify_ip_checksum(pkt) and verify_l4_checksum(pkt)
    assert UDPTemplate(src, dst, sport, dport, dscp=ds, ttl=hl).build(data) == pkt
    c = classify(pkt)
    assert c.key.src == src and c.key.dst == dst and (c.sport, c.dport) == (sport, dport)
    assert c.payload_len == len(data) and c.length == len(pkt) and c.dscp == ds


@SETTINGS
@given(pair, port, port, payload, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
       st.integers(0, 0xFF), st.integers(0, 0xFFFF),
       st.binary(max_size=40).map(lambda b: b[: len(b) // 4 * 4]))
def test_tcp_round_trip(addrs: tuple[str, str], sport: int, dport: int, data: bytes, seq: int,
                        ack: int, flags: int, win: int, opts: bytes) -> None:
    src, dst = addrs
    pkt = build_tcp(src, dst, sport, dport, data, seq=seq, ack=ack, flags=flags, window=win,
                    options=opts)
    p = parse(pkt)
    assert isinstance(p.l4, TCPHeader)
    assert (p.l4.sport, p.l4.dport, p.l4.seq, p.l4.ack, p.l4.flags, p.l4.window) == (
        sport, dport, seq, ack, flags, win)
    assert p.l4.header_len == 20 + len(opts) and p.payload(pkt) == data
    assert verify_l4_checksum(pkt)
    assert classify(pkt).tcp_flags == p.l4.flags_str


@SETTINGS
@given(pair, port, port, payload, st.booleans())
def test_icmp_echo_round_trip(addrs: tuple[str, str], ident: int, seq: int, data: bytes,
                              reply: bool) -> None:
    src, dst = addrs
    pkt = build_icmp_echo(src, dst, ident, seq, data, reply=reply)
    p = parse(pkt)
    assert isinstance(p.l4, ICMPHeader) and (p.l4.ident, p.l4.seq) == (ident, seq)
    assert p.payload(pkt) == data and verify_l4_checksum(pkt)
    k = classify(pkt).key
    assert (k.sport, k.dport) == (ident, 0)


@st.composite
def valid_packets(draw: st.DrawFn) -> bytes:
    src, dst = draw(pair)
    kind = draw(st.sampled_from(["udp", "tcp", "icmp"]))
    data = draw(st.binary(max_size=64))
    if kind == "udp":
        return build_udp(src, dst, draw(port), draw(port), data)
    if kind == "tcp":
        return build_tcp(src, dst, draw(port), draw(port), data, flags=draw(st.integers(0, 255)))
    return build_icmp_echo(src, dst, draw(port), draw(port), data)


def _only_parse_error(buf: bytes) -> None:
    """Everything that reads packets either works or raises ParseError."""
    for fn in (parse, classify, flow_key, verify_l4_checksum, verify_ip_checksum):
        with contextlib.suppress(ParseError):
            fn(buf)
    wire_key(buf)  # never raises at all


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120))
def test_random_bytes_only_parse_error(buf: bytes) -> None:
    _only_parse_error(buf)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([0x45, 0x46, 0x4F, 0x60, 0x61]), st.binary(max_size=120))
def test_random_ip_like_bytes_only_parse_error(first: int, rest: bytes) -> None:
    # bias towards plausible version/IHL so the deeper code is reached
    buf = bytes([first]) + rest
    if len(buf) >= 4 and first & 0xF0 == 0x40:
        buf = buf[:2] + len(buf).to_bytes(2, "big") + buf[4:]
    elif len(buf) >= 6:
        buf = buf[:4] + max(1, len(buf) - 40).to_bytes(2, "big") + buf[6:]
    _only_parse_error(buf)


@settings(max_examples=60, deadline=None)
@given(valid_packets())
def test_every_truncation_raises_parse_error(pkt: bytes) -> None:
    assert parse(pkt).total_len == len(pkt)
    for n in range(len(pkt)):
        try:
            parse(pkt[:n])
        except ParseError:
            continue
        raise AssertionError(f"truncated to {n} of {len(pkt)} bytes, still parsed")


@settings(max_examples=300, deadline=None)
@given(valid_packets(), st.data())
def test_mutations_only_parse_error(pkt: bytes, data: st.DataObject) -> None:
    buf = bytearray(pkt)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    _only_parse_error(bytes(buf))


@SETTINGS
@given(valid_packets(), st.data())
def test_payload_corruption_detected(pkt: bytes, data: st.DataObject) -> None:
    p = parse(pkt)
    if p.payload_len == 0:
        return
    i = data.draw(st.integers(p.payload_offset, p.payload_offset + p.payload_len - 1))
    buf = bytearray(pkt)
    buf[i] ^= data.draw(st.integers(1, 255))
    assert not verify_l4_checksum(bytes(buf))


@SETTINGS
@given(pair, port, port, st.sampled_from(["udp", "tcp", "icmp"]))
def test_reply_maps_to_same_flow(addrs: tuple[str, str], a: int, b: int, kind: str) -> None:
    src, dst = addrs
    if kind == "udp":
        out, back = build_udp(src, dst, a, b), build_udp(dst, src, b, a)
    elif kind == "tcp":
        out, back = build_tcp(src, dst, a, b), build_tcp(dst, src, b, a, flags="SA")
    else:
        out = build_icmp_echo(src, dst, a, b)
        back = build_icmp_echo(dst, src, a, b, reply=True)
    k = flow_key(out)
    assert flow_key(back, Direction.NET_TO_APP) == k
    assert reverse(reverse(k)) == k
    if kind != "icmp":
        assert flow_key(back) == reverse(k)
        assert classify(back, Direction.NET_TO_APP).key == k


@SETTINGS
@given(valid_packets(), valid_packets())
def test_wire_key_names_the_five_tuple(p1: bytes, p2: bytes) -> None:
    k1, k2 = wire_key(p1), wire_key(p2)
    c1, c2 = classify(p1), classify(p2)
    if c1.proto in (6, 17):
        assert k1 is not None
    if k1 is not None and k2 is not None:
        assert (k1 == k2) == (c1.key == c2.key)


@st.composite
def v6_with_ext_chain(draw: st.DrawFn) -> tuple[bytes, int, bytes]:
    """An IPv6 UDP datagram behind a random chain of extension headers; returns
    (packet, header length, UDP payload)."""
    from vstack.analysis.packet import build_ipv6

    src, dst = draw(st.tuples(v6, v6))
    data = draw(st.binary(max_size=40))
    udp = build_udp(src, dst, draw(port), draw(port), data)[40:]
    kinds = draw(st.lists(st.sampled_from([43, 60, 51, 135]), max_size=5))
    if draw(st.booleans()):
        kinds = [0, *kinds]  # hop-by-hop only first
    chain = b""
    nxt = 17
    for k in reversed(kinds):
        if k == 51:  # AH: (len + 2) * 4 bytes, 12 + 4n
            n = draw(st.integers(1, 4))
            h = bytes([nxt, n]) + bytes((n + 2) * 4 - 2)
        else:
            n = draw(st.integers(0, 3))
            h = bytes([nxt, n]) + draw(st.binary(min_size=(n + 1) * 8 - 2,
                                                  max_size=(n + 1) * 8 - 2))
        chain = h + chain
        nxt = k
    return build_ipv6(src, dst, nxt, chain + udp), 40 + len(chain), data


@SETTINGS
@given(v6_with_ext_chain())
def test_v6_extension_chain_round_trip(case: tuple[bytes, int, bytes]) -> None:
    pkt, hlen, data = case
    p = parse(pkt)
    assert p.proto == 17 and p.header_len == hlen and p.payload(pkt) == data
    assert isinstance(p.l4, UDPHeader) and verify_l4_checksum(pkt)
    for n in range(len(pkt)):
        try:
            parse(pkt[:n])
        except ParseError:
            continue
        raise AssertionError(f"truncated to {n} still parsed")


@settings(max_examples=300, deadline=None)
@given(v6_with_ext_chain(), st.data())
def test_v6_chain_mutations_only_parse_error(case: tuple[bytes, int, bytes],
                                             data: st.DataObject) -> None:
    buf = bytearray(case[0])
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(6, min(len(buf) - 1, case[1] + 8)))
        buf[i] = data.draw(st.integers(0, 255))
    _only_parse_error(bytes(buf))
    _only_parse_error(bytes(buf[: data.draw(st.integers(0, len(buf)))]))
