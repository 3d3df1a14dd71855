"""DCCP-UDP (RFC 6773 §3.3) against the kernel's UDP: datagrams the codec builds byte for
byte (``encode_udp``) are sent through a raw IPPROTO_UDP socket, so the kernel's own UDP
checksum check judges the codec's checksum; a zero UDP checksum (legal UDP over IPv4, not
DCCP-UDP) must not reach the DCCP-UDP socket (its BPF filter); neither may a wrong one.
Loopback only, on ephemeral ports."""

from __future__ import annotations

import os
import socket
import time

import pytest

from vstack.dccp.packet import DccpPacket, PacketType, decode, encode_udp
from vstack.dccp.transport import RxDatagram, UdpDccpSocket

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]


def _drain(sock: UdpDccpSocket, want: int) -> list[RxDatagram]:
    got: list[RxDatagram] = []
    end = time.monotonic() + 2.0
    while time.monotonic() < end and len(got) < want + 1:
        try:
            dg = sock.recv_one()
        except BlockingIOError:
            time.sleep(0.01)
            continue
        if isinstance(dg, list):  # a UDP_GRO read: its datagrams in order
            got.extend(dg)
        elif dg is not None:
            got.append(dg)
    return got


@pytest.mark.parametrize("family,addr", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_kernel_accepts_codec_checksum_and_filter_drops_zero(family: int, addr: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (raw IPPROTO_UDP socket)")
    server = UdpDccpSocket(family, bind=addr)
    raw = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_UDP)
    try:
        assert server.filtered
        pkts = [DccpPacket(PacketType.DATA, 5555, 5001, seq, payload=b"n%d" % seq)
                for seq in range(3)]
        good = [encode_udp(p, addr, addr, 40000, server.port) for p in pkts]
        zero = bytearray(good[1])
        zero[6:8] = b"\0\0"  # "no checksum": the kernel takes it over IPv4, we must not
        wrong = bytearray(good[2])
        wrong[6] ^= 0x55  # a wrong checksum: the kernel drops it
        for d in (good[0], bytes(zero), bytes(wrong), good[1]):
            raw.sendto(d, (addr, 0))
        got = _drain(server, 2)
    finally:
        raw.close()
        server.close()
    assert [decode(dg.data, verify=False) for dg in got] == [pkts[0], pkts[1]]
    assert all(dg.udp_port == 40000 and dg.src == addr for dg in got)
