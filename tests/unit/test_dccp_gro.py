"""DCCP-UDP with UDP_GSO out and UDP_GRO in (issue 6): a coalesced read is split into
exactly the DCCP packets that were sent (no byte lost, none reordered), each still
checked by the RFC 6773 §3.3 length rules; where the kernel refuses UDP_GRO or
UDP_SEGMENT, the socket falls back to one datagram per read / per send. Loopback UDP
sockets, no root."""

from __future__ import annotations

import socket
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vstack.dccp import transport
from vstack.dccp.packet import DccpPacket, PacketType, decode, encode
from vstack.dccp.transport import RxDatagram, UdpDccpSocket


def _drain(sock: UdpDccpSocket, want: int, wait: float = 2.0) -> list[RxDatagram]:
    got: list[RxDatagram] = []
    end = time.monotonic() + wait
    while time.monotonic() < end and len(got) < want:
        try:
            dg = sock.recv_one()
        except BlockingIOError:
            time.sleep(0.002)
            continue
        if isinstance(dg, list):
            got.extend(dg)
        elif dg is not None:
            got.append(dg)
    return got


def _packets(n: int, size: int, last: int, first_seq: int = 100) -> list[bytes]:
    """n DCCP-Data packets (DCCP checksum zero, as DCCP-UDP sends them) with payloads of
    ``size`` bytes (the last ``last`` bytes), each payload distinct."""
    out = []
    for i in range(n):
        ln = last if i == n - 1 else size
        body = bytes((i * 7 + j) & 0xFF for j in range(ln))
        out.append(encode(DccpPacket(PacketType.DATA, 4000, 5001, first_seq + i,
                                     payload=body), None, None))
    return out


def _pair(gro: bool = True) -> tuple[UdpDccpSocket, UdpDccpSocket]:
    server = UdpDccpSocket(socket.AF_INET, bind="127.0.0.1", gro=gro)
    client = UdpDccpSocket(socket.AF_INET, bind="127.0.0.1")
    return server, client


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 64), size=st.integers(0, 1000), short=st.integers(0, 1000))
def test_gro_read_splits_into_exactly_the_packets_sent(n: int, size: int, short: int) -> None:
    last = min(size, short)  # UDP GSO: every segment equal, the last may be shorter
    sent = _packets(n, size, last)
    server, client = _pair()
    try:
        assert server.gro, "this kernel (>= 5.0) should take UDP_GRO"
        assert client.sendto_many(sent, "127.0.0.1", server.port) == n
        got = _drain(server, n)
        extra = _drain(server, 1, wait=0.05)
    finally:
        client.close()
        server.close()
    assert [bytes(dg.data) for dg in got] == sent  # every byte, in order
    assert extra == []
    assert all(dg.udp_port == client.port and dg.src == "127.0.0.1" for dg in got)
    assert client.stats.tx_gso >= 1
    assert server.stats.rx_gro >= 1
    # the views decode like the bytes they stand for
    assert [decode(dg.data, verify=False).seq for dg in got] == list(range(100, 100 + n))


def test_bad_segment_in_a_gro_read_is_dropped_alone() -> None:
    good = _packets(3, 40, 40)
    bad = bytearray(good[1])
    bad[4] = 200  # Data Offset past the datagram (RFC 6773 §3.3): count and drop
    server, _client = _pair()
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        seg = len(good[0])
        raw.sendmsg([good[0] + bytes(bad) + good[2]],
                    [(17, 103, seg.to_bytes(2, sys.byteorder))], 0, ("127.0.0.1", server.port))
        got = _drain(server, 2)
    finally:
        raw.close()
        _client.close()
        server.close()
    assert [bytes(d.data) for d in got] == [good[0], good[2]]
    assert server.stats.rx_bad == 1 and server.stats.rx_gro == 1


def test_gro_refused_falls_back_to_one_datagram_per_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "_UDP_GRO", 0x7FFF)  # an option no kernel knows
    sent = _packets(20, 300, 120)
    server, client = _pair()
    try:
        assert not server.gro
        assert client.sendto_many(sent, "127.0.0.1", server.port) == 20
        got = _drain(server, 20)
    finally:
        client.close()
        server.close()
    assert [bytes(dg.data) for dg in got] == sent
    assert server.stats.rx_gro == 0
    assert all(isinstance(dg.data, bytes) for dg in got)


def test_gso_refused_falls_back_to_one_send_each(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "_UDP_SEGMENT", 0x7FFF)  # the kernel: EINVAL
    sent = _packets(10, 200, 200)
    server, client = _pair()
    try:
        assert client.sendto_many(sent, "127.0.0.1", server.port) == 10
        assert not client.gso and client.stats.tx_gso == 0  # remembered
        assert client.sendto_many(sent, "127.0.0.1", server.port) == 10
        got = _drain(server, 20)
    finally:
        client.close()
        server.close()
    assert [bytes(dg.data) for dg in got] == sent + sent
