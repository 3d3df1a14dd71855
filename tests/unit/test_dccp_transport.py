"""DCCP transports without root: checksum helpers against the codec, DCCP-UDP loopback I/O,
and bad input giving typed errors."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vstack.dccp import checksum as cs
from vstack.dccp.packet import PacketType, decode
from vstack.dccp.transport import (
    IPPROTO_DCCP,
    IPPROTO_UDP,
    RxDatagram,
    TransportError,
    UdpDccpSocket,
    checksum_ok,
    dccp_checksum,
    family_of,
    open_socket,
    reprotect,
)


def _request(sport: int = 40000, dport: int = 5001, payload: bytes = b"") -> bytes:
    """A hand-built DCCP-Request (X=1) with a zero checksum field."""
    hdr = struct.pack("!HHBBH", sport, dport, 5, 0, 0)
    hdr += bytes([(0 << 1) | 1, 0]) + (123456789).to_bytes(6, "big")
    hdr += struct.pack("!I", 0x44434350)
    return hdr + payload


def test_native_checksum_matches_codec_checksum() -> None:
    pkt = reprotect(_request(payload=b"abc"), "10.0.0.1", "10.0.0.2", IPPROTO_DCCP)
    assert cs.check(pkt, "10.0.0.1", "10.0.0.2")
    assert checksum_ok(pkt, "10.0.0.1", "10.0.0.2")
    assert not checksum_ok(pkt, "10.0.0.1", "10.0.0.3")


@settings(max_examples=60, deadline=None)
@given(payload=st.binary(max_size=64), cscov=st.integers(0, 15), v6=st.booleans())
def test_checksum_agrees_with_codec(payload: bytes, cscov: int, v6: bool) -> None:
    src, dst = ("fd00::1", "fd00::2") if v6 else ("10.1.1.1", "10.2.2.2")
    base = bytearray(_request(payload=payload))
    base[5] = cscov
    raw = reprotect(bytes(base), src, dst, IPPROTO_DCCP)
    assert cs.check(raw, src, dst)
    assert checksum_ok(raw, src, dst)
    assert not checksum_ok(reprotect(raw, src, dst, IPPROTO_UDP), src, dst)


def test_bad_input_is_a_typed_error() -> None:
    with pytest.raises(TransportError):
        family_of("not-an-ip")
    with pytest.raises(TransportError):
        open_socket("sctp", socket.AF_INET)
    with pytest.raises(ValueError):
        dccp_checksum(b"\x00" * 5, "10.0.0.1", "10.0.0.2")
    assert not checksum_ok(b"\x00" * 3, "10.0.0.1", "10.0.0.2")
    with UdpDccpSocket(socket.AF_INET, bind="127.0.0.1") as s:
        assert s.kind == "udp" and not s.dccp_checksum
        with pytest.raises(TransportError):
            s.sendto(b"x" * 5, "127.0.0.1", 7001)  # not a DCCP packet
        with pytest.raises(TransportError, match="UDP port"):
            s.sendto(_request(), "127.0.0.1")  # the UDP port is not the DCCP port


@pytest.mark.parametrize("family,addr", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_udp_socket_loopback_carries_the_whole_dccp_packet(family: int, addr: str) -> None:
    """RFC 6773 §3: the UDP payload is the whole DCCP packet; its DCCP ports (5555 -> 5001)
    are not the UDP ports; the DCCP Checksum goes out as zero (§3.3)."""

    async def run() -> tuple[list[RxDatagram], int]:
        loop = asyncio.get_running_loop()
        got: list[RxDatagram] = []
        done = asyncio.Event()
        server = UdpDccpSocket(family, port=0)  # wildcard: dst comes from PKTINFO
        client = UdpDccpSocket(family, bind=addr)
        try:

            def rx(dg: RxDatagram) -> None:
                got.append(dg)
                if len(got) == 3:
                    done.set()

            server.attach(loop, rx)
            pkt = reprotect(_request(5555, 5001, b"abc"), addr, addr, IPPROTO_DCCP)
            assert pkt[6:8] != b"\0\0"
            for _ in range(3):
                assert client.sendto(pkt, addr, server.port)
            await asyncio.wait_for(done.wait(), 5)
        finally:
            server.close()
            client.close()
            server.close()  # idempotent
        return got, client.port

    got, client_port = asyncio.run(run())
    assert len(got) == 3
    for dg in got:
        assert dg.src == addr and dg.dst == addr
        assert dg.udp_port == client_port != 5555
        assert dg.data == _request(5555, 5001, b"abc")  # checksum field zero, ports kept
        p = decode(dg.data, verify=False)
        assert (p.type, p.sport, p.dport, p.payload) == (PacketType.REQUEST, 5555, 5001, b"abc")


@pytest.mark.parametrize("family,addr", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_udp_socket_drops_what_rfc6773_drops(family: int, addr: str) -> None:
    """UDP Length < 20 never reaches us (the socket's BPF filter); a DCCP header longer than
    the datagram is counted in rx_bad and dropped; a good packet after them arrives."""

    async def run() -> tuple[list[RxDatagram], int, bool]:
        loop = asyncio.get_running_loop()
        got: list[RxDatagram] = []
        done = asyncio.Event()
        server = UdpDccpSocket(family, bind=addr)
        plain = socket.socket(family, socket.SOCK_DGRAM)
        try:

            def rx(dg: RxDatagram) -> None:
                got.append(dg)
                done.set()

            server.attach(loop, rx)
            good = _request(1, 2)
            plain.sendto(good[:11], (addr, server.port))  # UDP Length 19
            plain.sendto(good[:16], (addr, server.port))  # Data Offset 5: header > 16 bytes
            plain.sendto(good, (addr, server.port))
            await asyncio.wait_for(done.wait(), 5)
            await asyncio.sleep(0.05)  # anything else that was going to arrive
        finally:
            plain.close()
            server.close()
        return got, server.stats.rx_bad, server.filtered

    got, rx_bad, filtered = asyncio.run(run())
    assert filtered
    assert [dg.data for dg in got] == [_request(1, 2)]
    assert rx_bad == 1  # the 16-byte one; the 11-byte one was the kernel filter's
