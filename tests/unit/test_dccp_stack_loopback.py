"""DccpStack against an in-process ``DccpServer`` over DCCP-UDP on loopback (no root):
queueing during the handshake with drops counted, delivery of replies, a peer that
vanishes mid-flow and a Reset both reported to the engine, never a hang."""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import pytest

from tests.aio import until as _until
from vstack.dccp.ccid2 import Ccid2Config
from vstack.dccp.endpoint import DccpClient, DccpServer
from vstack.dccp.packet import DccpPacket, PacketType, ResetCode, decode, encode
from vstack.execution.stacks.base import STACKS, StackContext, StackError
from vstack.execution.stacks.dccp import DccpStack


def _port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ctx(loop: asyncio.AbstractEventLoop, port: int, got: list[bytes],
         errors: list[StackError], **options: Any) -> StackContext:
    opts: dict[str, Any] = {"transport": "udp", **options}
    return StackContext(loop=loop, family=4, target=("127.0.0.1", port), deliver=got.append,
                        on_error=errors.append, options=opts)


def test_registered() -> None:
    assert STACKS["dccp"] is DccpStack


def test_queue_during_handshake_then_echo() -> None:
    async def run() -> tuple[DccpStack, list[bytes], list[StackError]]:
        loop = asyncio.get_running_loop()
        port = _port()
        srv = await DccpServer.start(port=port, bind="127.0.0.1", transport="udp", echo=True)
        got: list[bytes] = []
        errors: list[StackError] = []
        st = DccpStack(_ctx(loop, port, got, errors, queue=5))
        try:
            st.open()
            assert not st.ready
            for i in range(8):  # before the handshake: 5 queued, 3 dropped
                st.send(b"early %d" % i)
            assert st.metrics.drops == 3
            await _until(lambda: st.ready)
            for i in range(200):
                st.send(b"late %d" % i)
                await asyncio.sleep(0)
            await _until(lambda: len(got) == 205)
            await _until(lambda: st.metrics.rtt_ms > 0)  # pulled from CCID2 periodically
        finally:
            st.close()
            st.close()  # idempotent
            await asyncio.sleep(0.2)
            srv.close()
        return st, got, errors

    st, got, errors = asyncio.run(run())
    assert got[:5] == [b"early %d" % i for i in range(5)]
    assert sorted(got[5:]) == sorted(b"late %d" % i for i in range(200))
    assert errors == []
    assert st.metrics.packets_out == 205 and st.metrics.packets_in == 205
    assert st.metrics.rtt_ms > 0
    assert st.handshake_done is not None and st.handshake_started is not None


def test_peer_vanishing_is_reported_not_hung() -> None:
    async def run() -> tuple[DccpStack, list[StackError]]:
        loop = asyncio.get_running_loop()
        port = _port()
        srv = await DccpServer.start(port=port, bind="127.0.0.1", transport="udp")
        got: list[bytes] = []
        errors: list[StackError] = []
        conn = {"max_rto_timeouts": 2, "ccid2": Ccid2Config(min_rto=0.05, initial_rto=0.1)}
        st = DccpStack(_ctx(loop, port, got, errors, conn=conn))
        st.open()
        await _until(lambda: st.ready)
        st.send(b"before")
        await asyncio.sleep(0.1)
        for ep in list(srv.connections.values()):  # the peer vanishes: no Reset, no Close
            ep.abort()
        srv.sock.close()
        for i in range(20):
            st.send(b"into the void %d" % i)
        await _until(lambda: bool(errors), timeout=20)
        st.send(b"after")  # counted as a drop, no exception
        st.close()
        return st, errors

    st, errors = asyncio.run(run())
    assert len(errors) == 1
    assert errors[0].stack == "dccp" and errors[0].remote
    assert "vanished" in errors[0].reason
    assert st.metrics.drops >= 1


def test_reset_from_peer_is_reported() -> None:
    async def run() -> list[StackError]:
        loop = asyncio.get_running_loop()
        port = _port()
        srv = await DccpServer.start(port=port, bind="127.0.0.1", transport="udp",
                                     service_code=0x1234)
        errors: list[StackError] = []
        st = DccpStack(_ctx(loop, port, [], errors))  # default code: Reset 8 from the server
        st.open()
        st.send(b"queued while handshaking")
        await _until(lambda: bool(errors))
        st.close()
        srv.close()
        return errors

    errors = asyncio.run(run())
    assert len(errors) == 1 and errors[0].remote
    assert "code 8" in errors[0].reason


def test_open_failure_raises_and_reports_nothing() -> None:
    """A connection that cannot even start makes ``open`` raise (the engine turns that into
    EngineError and keeps / falls back to another stack); nothing is reported, nothing
    stays open."""
    async def run() -> tuple[DccpStack, list[StackError]]:
        loop = asyncio.get_running_loop()
        errors: list[StackError] = []
        st = DccpStack(_ctx(loop, 9, [], errors, transport="sctp"))
        with pytest.raises(OSError, match="unknown DCCP transport"):
            st.open()
        st.send(b"x")
        st.close()
        return st, errors

    st, errors = asyncio.run(run())
    assert errors == [] and st.client is None
    assert st.metrics.drops == 1


def test_malformed_packets_are_counted_and_dropped() -> None:
    """DCCP-UDP junk at the server's UDP port: each kind dropped where RFC 6773 §3.3 says,
    and the real connection is untouched."""

    async def run() -> tuple[DccpServer, list[bytes], list[bytes]]:
        loop = asyncio.get_running_loop()
        port = _port()
        srv = await DccpServer.start(port=port, bind="127.0.0.1", transport="udp", echo=True)
        got: list[bytes] = []
        errors: list[StackError] = []
        replies: list[bytes] = []
        st = DccpStack(_ctx(loop, port, got, errors))
        junk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        junk.bind(("127.0.0.1", 0))
        junk.setblocking(False)
        try:
            st.open()
            await _until(lambda: st.ready)
            dest = ("127.0.0.1", port)
            junk.sendto(b"\x01", dest)  # UDP Length 9 < 20: the socket's kernel filter
            junk.sendto(struct.pack("!HHB", 1, port, 5) + bytes(11), dest)  # header > datagram
            junk.sendto(struct.pack("!HHB", 1, port, 5) + b"\xff" * 35, dest)  # type 15
            # a Data packet with a nonsense DCCP checksum from a new peer: the checksum is
            # ignored (RFC 6773 §3.3), so the listener answers Reset(No Connection)
            data = encode(DccpPacket(PacketType.DATA, 1, port, 77, payload=b"?"), None, None)
            junk.sendto(data[:6] + b"\xbe\xef" + data[8:], dest)
            st.send(b"still fine")
            await _until(lambda: got == [b"still fine"])
            await _until(lambda: srv.rx_malformed >= 1 and srv.sock.stats.rx_bad >= 1)
            await _until(lambda: srv.listener.resets_sent >= 1)

            async def reply() -> None:
                replies.append(await loop.sock_recv(junk, 2048))

            await asyncio.wait_for(reply(), 5)
        finally:
            junk.close()
            st.close()
            await asyncio.sleep(0.1)
            srv.close()
        assert errors == []
        return srv, got, replies

    srv, _got, replies = asyncio.run(run())
    assert srv.rx_malformed == 1 and srv.sock.stats.rx_bad == 1
    assert srv.listener.resets_sent == 1
    reset = decode(replies[0], verify=False)
    assert reset.type == PacketType.RESET and reset.reset_code == ResetCode.NO_CONNECTION
    assert (reset.sport, reset.dport, reset.ack) == (srv.port, 1, 77)
    assert replies[0][6:8] == b"\0\0"  # DCCP checksum sent as zero (RFC 6773 §3.3)


def _request(sport: int, dport: int, seq: int) -> bytes:
    pkt = DccpPacket(PacketType.REQUEST, sport, dport, seq, service_code=0x44434350)
    return encode(pkt, None, None)  # DCCP checksum zero, as DCCP-UDP sends it


def test_demux_by_udp_4tuple_then_dccp_ports() -> None:
    """RFC 6773 §3.8: the server keys connections by the UDP 4-tuple and holds one active
    DCCP connection per 4-tuple (the first method). Another DCCP port pair on a busy
    4-tuple is kept from the DCCP module and answered with Reset 12, Data 1 = its type,
    Data 2-3 = its UDP source port (§7.2); the same DCCP ports from another UDP port are
    another connection (two hosts behind a NAPT may pick the same DCCP port)."""

    async def run() -> tuple[DccpServer, list[bytes], list[bytes], int, int, set[Any]]:
        loop = asyncio.get_running_loop()
        port = _port()
        srv = await DccpServer.start(port=port, bind="127.0.0.1", transport="udp")
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        got_a: list[bytes] = []
        got_b: list[bytes] = []
        try:
            for s in (a, b):
                s.bind(("127.0.0.1", 0))
                s.setblocking(False)
            dest = ("127.0.0.1", port)
            a.sendto(_request(1111, port, 10), dest)
            got_a.append(await asyncio.wait_for(loop.sock_recv(a, 2048), 5))  # Response
            a.sendto(_request(2222, port, 20), dest)  # same UDP 4-tuple, other DCCP port
            got_a.append(await asyncio.wait_for(loop.sock_recv(a, 2048), 5))  # Reset 12
            b.sendto(_request(1111, port, 30), dest)  # same DCCP ports, other UDP port
            got_b.append(await asyncio.wait_for(loop.sock_recv(b, 2048), 5))  # Response
            await asyncio.sleep(0.05)
            keys = set(srv.connections)
            return srv, got_a, got_b, a.getsockname()[1], b.getsockname()[1], keys
        finally:
            a.close()
            b.close()
            srv.close()

    srv, got_a, got_b, port_a, port_b, keys = asyncio.run(run())
    assert keys == {("127.0.0.1", port_a), ("127.0.0.1", port_b)}
    resp = decode(got_a[0], verify=False)
    assert resp.type == PacketType.RESPONSE and (resp.sport, resp.dport, resp.ack) == (
        srv.port, 1111, 10)
    reset = decode(got_a[1], verify=False)
    assert reset.type == PacketType.RESET
    assert reset.reset_code == ResetCode.ENCAPSULATED_PORT_REUSE == 12
    assert reset.reset_data == bytes((PacketType.REQUEST,)) + struct.pack("!H", port_a)
    assert (reset.sport, reset.dport, reset.ack) == (srv.port, 2222, 20)
    assert srv.port_reuse == 1 and srv.listener.requests == 2
    resp_b = decode(got_b[0], verify=False)
    assert resp_b.type == PacketType.RESPONSE and (resp_b.dport, resp_b.ack) == (1111, 30)
    assert srv.accepted == 0  # neither finished its handshake; both were kept apart


def test_client_udp_ports_are_not_dccp_ports() -> None:
    """A DccpClient over DCCP-UDP: its own UDP socket (an ephemeral source port for this
    connection alone, RFC 6773 §3.8), the server's UDP port as destination, and DCCP ports
    of its own in the DCCP header; the server may listen on a UDP port other than its
    DCCP port."""

    async def run() -> tuple[list[bytes], tuple[str, int], tuple[str, int, int], int, int]:
        port, uport = _port(), _port()
        srv = await DccpServer.start(port=port, bind="127.0.0.1", transport="udp", echo=True,
                                     udp_port=uport)
        got: list[bytes] = []
        c = DccpClient(("127.0.0.1", port), transport="udp", udp_port=uport,
                       on_datagram=got.append)
        try:
            await c.open()
            assert c.send(b"ping")
            await _until(lambda: got == [b"ping"])
            (key, active), = srv.udp_active.items()
            return got, key, active, c.local_port, int(getattr(c.sock, "port", 0))
        finally:
            c.close()
            await asyncio.sleep(0.05)
            c.release()
            srv.close()

    got, key, active, dccp_port, udp_port = asyncio.run(run())
    assert got == [b"ping"]
    assert key == ("127.0.0.1", udp_port)  # the UDP 4-tuple
    assert active[1] == dccp_port  # the DCCP ports inside it
