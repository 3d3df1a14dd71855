"""virtio_net_hdr codec and UDP super-packet split/coalesce: no byte lost or reordered,
and every datagram's checksums verify."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vstack.analysis.packet import build_udp, internet_checksum, parse, verify_l4_checksum
from vstack.vnic import vnet

ADDRS = st.sampled_from([("10.0.0.1", "10.201.1.2"), ("fd00::1", "fd01::2")])


def _super_packet(src: str, dst: str, payload: bytes, gso_size: int) -> tuple[vnet.VnetHdr, bytes]:
    pkt = build_udp(src, dst, 40000, 9000, payload)
    off = 20 if ":" not in src else 40
    hdr = vnet.VnetHdr(vnet.F_NEEDS_CSUM, vnet.GSO_UDP_L4, off + 8, gso_size, off, 6)
    return hdr, pkt


def test_header_roundtrip() -> None:
    h = vnet.VnetHdr(1, vnet.GSO_UDP_L4, 28, 1472, 20, 6)
    assert vnet.parse_hdr(h.pack()) == h
    assert len(h.pack()) == vnet.VNET_HDR_LEN
    with pytest.raises(vnet.VnetError):
        vnet.parse_hdr(b"\x00" * 9)


@settings(max_examples=60, deadline=None)
@given(ADDRS, st.integers(1, 1472), st.binary(min_size=0, max_size=20000))
def test_split_keeps_every_byte_in_order(addrs: tuple[str, str], size: int, payload: bytes) -> None:
    src, dst = addrs
    hdr, pkt = _super_packet(src, dst, payload, size)
    segs = vnet.split_udp(pkt, hdr)
    got = b""
    for seg in segs:
        p = parse(seg)
        assert (p.src, p.dst, p.sport, p.dport) == (src, dst, 40000, 9000)
        assert verify_l4_checksum(seg)
        body = p.payload(seg)
        assert len(body) <= size
        got += body
    assert got == payload
    assert [bytes(m) for m in vnet.udp_payloads(pkt, hdr)] == [parse(s).payload(s) for s in segs]


@settings(max_examples=40, deadline=None)
@given(ADDRS, st.binary(min_size=0, max_size=1400))
def test_complete_csum_restores_a_valid_checksum(addrs: tuple[str, str], payload: bytes) -> None:
    src, dst = addrs
    vh, pkt = vnet.coalesce_udp(build_udp(src, dst, 1, 2, b"x"), [payload])
    hdr = vnet.parse_hdr(vh)
    assert hdr.gso == vnet.GSO_NONE and hdr.needs_csum
    buf = bytearray(pkt)
    vnet.complete_csum(buf, hdr)
    assert verify_l4_checksum(buf)
    assert parse(buf).payload(buf) == payload


def _kernel_segment(hdr: vnet.VnetHdr, pkt: bytes) -> list[bytes]:
    """What the kernel does with a GSO_UDP_L4 super-packet (__udp_gso_segment): copy the
    headers, adjust the partial checksum for the new length, then finish it."""
    off = hdr.csum_start
    body = pkt[off + 8:]
    out = []
    for i in range(0, len(body), hdr.gso_size):
        chunk = body[i:i + hdr.gso_size]
        ulen = 8 + len(chunk)
        old = int.from_bytes(pkt[off + 6:off + 8], "big")
        oldlen = int.from_bytes(pkt[off + 4:off + 6], "big")
        s = old + (~oldlen & 0xFFFF) + ulen
        while s >> 16:
            s = (s & 0xFFFF) + (s >> 16)
        h = bytearray(pkt[:off + 8])
        if pkt[0] >> 4 == 4:
            h[2:4] = (off + ulen).to_bytes(2, "big")
            h[10:12] = b"\0\0"
            h[10:12] = internet_checksum(bytes(h[:20])).to_bytes(2, "big")
        else:
            h[4:6] = ulen.to_bytes(2, "big")
        h[off + 4:off + 6] = ulen.to_bytes(2, "big")
        h[off + 6:off + 8] = s.to_bytes(2, "big")
        seg = bytearray(h + chunk)
        vnet.complete_csum(seg, vnet.VnetHdr(vnet.F_NEEDS_CSUM, 0, 0, 0, off, 6))
        out.append(bytes(seg))
    return out


@settings(max_examples=40, deadline=None)
@given(ADDRS, st.integers(1, 1472), st.integers(2, 40), st.integers(0, 1472))
def test_coalesced_super_packet_segments_into_valid_datagrams(
        addrs: tuple[str, str], size: int, n: int, last: int) -> None:
    src, dst = addrs
    last = min(max(last, 1), size)
    payloads = [bytes([i % 256]) * size for i in range(n - 1)] + [b"z" * last]
    if sum(map(len, payloads)) + 48 > 0xFFFF:
        return
    vh, pkt = vnet.coalesce_udp(build_udp(src, dst, 5000, 6000, b""), payloads)
    hdr = vnet.parse_hdr(vh)
    assert hdr.gso == vnet.GSO_UDP_L4 and hdr.gso_size == size
    segs = _kernel_segment(hdr, pkt)
    assert [parse(s).payload(s) for s in segs] == payloads
    assert all(verify_l4_checksum(s) for s in segs)


def test_refuses_what_it_cannot_split() -> None:
    tcpish = bytearray(build_udp("10.0.0.1", "10.0.0.2", 1, 2, b"abc"))
    tcpish[9] = 6
    with pytest.raises(vnet.VnetError):
        vnet.split_udp(bytes(tcpish), vnet.VnetHdr())
    with pytest.raises(vnet.VnetError):
        vnet.complete_csum(bytearray(b"\x45" + b"\0" * 19), vnet.VnetHdr(1, 0, 0, 0, 30, 6))
    with pytest.raises(ValueError):
        vnet.coalesce_udp(build_udp("10.0.0.1", "10.0.0.2", 1, 2, b""), [b"ab", b"abc"])
