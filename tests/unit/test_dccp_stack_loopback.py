"""DccpStack against an in-process ``DccpServer`` over DCCP-UDP on loopback (no root):
queueing during the handshake with drops counted, delivery of replies, a peer that
vanishes mid-flow and a Reset both reported to the engine, never a hang."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from vstack.dccp.ccid2 import Ccid2Config
from vstack.dccp.endpoint import DccpServer
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


async def _until(cond: Any, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.01)


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
    async def run() -> tuple[DccpServer, list[bytes]]:
        loop = asyncio.get_running_loop()
        port = _port()
        srv = await DccpServer.start(port=port, bind="127.0.0.1", transport="udp", echo=True)
        got: list[bytes] = []
        errors: list[StackError] = []
        st = DccpStack(_ctx(loop, port, got, errors))
        try:
            st.open()
            await _until(lambda: st.ready)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as junk:
                junk.sendto(b"\x01", ("127.0.0.1", port))  # too short for a DCCP header
                junk.sendto(b"\xff" * 40, ("127.0.0.1", port))  # a new peer, not DCCP
                junk.sendto(b"\x00" * 40, ("127.0.0.1", port))  # bad checksum
            st.send(b"still fine")
            await _until(lambda: got == [b"still fine"])
            await _until(lambda: srv.rx_malformed >= 2 and srv.sock.stats.rx_bad >= 1)
        finally:
            st.close()
            await asyncio.sleep(0.1)
            srv.close()
        assert errors == []
        return srv, got

    srv, _got = asyncio.run(run())
    assert srv.rx_malformed == 2 and srv.sock.stats.rx_bad == 1
    assert srv.accepted == 1
