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
from vstack.dccp.packet import decap_udp, encap_udp
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
        with pytest.raises(TransportError):
            s.sendto(b"x" * 5, "127.0.0.1")  # not a DCCP packet
        with pytest.raises(TransportError):
            s.sendto(_request(s.port + 1 if s.port < 65535 else 1), "127.0.0.1")  # wrong port


@pytest.mark.parametrize("family,addr", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_udp_socket_loopback_reports_both_addresses(family: int, addr: str) -> None:
    async def run() -> list[RxDatagram]:
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
            pkt = reprotect(_request(client.port, server.port), addr, addr, IPPROTO_DCCP)
            for _ in range(3):
                assert client.sendto(pkt, addr)
            await asyncio.wait_for(done.wait(), 5)
        finally:
            server.close()
            client.close()
            server.close()  # idempotent
        return got

    got = asyncio.run(run())
    assert len(got) == 3
    for dg in got:
        assert dg.src == addr and dg.dst == addr
        assert dg.udp_port != 0
        # the native packet comes back byte for byte, ports restored from the UDP header
        assert checksum_ok(dg.data, dg.src, dg.dst)
        assert decap_udp(encap_udp(dg.data, addr, addr), addr, addr) == dg.data
        assert struct.unpack_from("!H", dg.data, 0)[0] == dg.udp_port
