"""DCCP clients free what they hold (no root: DCCP-UDP on loopback): a client whose
construction fails closes its socket; a closed stack frees its socket at the peer's
Reset(Closed), and stacks closed in bulk are freed when the loop shuts down; forked
workers draw raw client ports from disjoint slices."""

from __future__ import annotations

import asyncio
import itertools
import socket
from typing import Any

import pytest

from tests.aio import until as _until
from vstack.dccp import endpoint as dep
from vstack.dccp.endpoint import DccpClient, DccpServer, port_slice, set_port_slice
from vstack.dccp.transport import TransportError, open_socket
from vstack.execution.stacks import dccp as dstack
from vstack.execution.stacks.base import StackContext, StackError
from vstack.execution.stacks.dccp import DccpStack


def _port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ctx(loop: asyncio.AbstractEventLoop, port: int, errors: list[StackError]) -> StackContext:
    return StackContext(loop=loop, family=4, target=("127.0.0.1", port), deliver=lambda _d: None,
                        on_error=errors.append, options={"transport": "udp"})


def _closed(c: DccpClient) -> bool:
    try:
        c.sock.fileno()
    except TransportError:
        return True
    return False


def test_client_that_fails_to_build_closes_its_socket() -> None:
    async def run() -> None:
        sock = open_socket("udp", socket.AF_INET, bind="127.0.0.1")
        with pytest.raises(TypeError):
            DccpClient(("127.0.0.1", 9), transport="udp", sock=sock,
                       conn_options={"no_such_option": 1})
        with pytest.raises(TransportError, match="closed"):
            sock.fileno()
    asyncio.run(run())


def test_closed_stack_is_freed_at_the_peers_reset(monkeypatch: Any) -> None:
    monkeypatch.setattr(dstack, "LINGER_S", 300.0)  # only the Reset(Closed) can free it

    async def run() -> None:
        loop = asyncio.get_running_loop()
        port = _port()
        srv = await DccpServer.start(port=port, bind="127.0.0.1", transport="udp", echo=True)
        errors: list[StackError] = []
        st = DccpStack(_ctx(loop, port, errors))
        st.open()
        await _until(lambda: st.ready)
        st.close()
        c = st.client
        assert c is not None and dstack.lingering() == 1
        await _until(lambda: dstack.lingering() == 0)
        assert _closed(c) and errors == []
        srv.close()
    asyncio.run(run())


def test_stacks_closed_in_bulk_are_freed_at_loop_shutdown(monkeypatch: Any) -> None:
    monkeypatch.setattr(dstack, "LINGER_S", 300.0)
    clients: list[DccpClient] = []

    async def run() -> None:
        loop = asyncio.get_running_loop()
        port = _port()
        srv = await DccpServer.start(port=port, bind="127.0.0.1", transport="udp")
        stacks = [DccpStack(_ctx(loop, port, [])) for _ in range(20)]
        for st in stacks:
            st.open()
        await _until(lambda: all(st.ready for st in stacks))
        srv.sock.close()  # the peer goes silent: no Reset will ever come
        for st in stacks:  # eviction: all at once
            st.close()
            assert st.client is not None
            clients.append(st.client)
        assert dstack.lingering() == 20
        assert not any(_closed(c) for c in clients)
        # the loop ends here: asyncio.run cancels the lingering releases

    asyncio.run(run())
    assert len(clients) == 20 and all(_closed(c) for c in clients)
    assert dstack.lingering() == 0


def test_a_stack_closed_outside_a_running_loop_is_freed_at_once() -> None:
    loop = asyncio.new_event_loop()
    try:
        async def build() -> tuple[DccpStack, DccpServer]:
            port = _port()
            srv = await DccpServer.start(port=port, bind="127.0.0.1", transport="udp")
            st = DccpStack(_ctx(asyncio.get_running_loop(), port, []))
            st.open()
            await _until(lambda: st.ready)
            return st, srv

        st, srv = loop.run_until_complete(build())
        st.close()  # the loop is not running: nothing could ever free it later
        assert st.client is not None and _closed(st.client)
        srv.close()
    finally:
        loop.close()


def test_port_slices_are_disjoint_and_used() -> None:
    try:
        slices = [set_port_slice(i, 4) for i in range(4)]
        for (lo, hi), (lo2, _hi2) in itertools.pairwise(slices):
            assert lo <= hi < lo2
        assert slices[0][0] == dep.PORT_LO and slices[-1][1] <= dep.PORT_HI
        set_port_slice(2, 4)
        assert port_slice() == slices[2]
        lo, hi = slices[2]
        remote = ("192.0.2.1", 5001)
        got = [dep._allocate_port(remote) for _ in range(200)]
        assert all(lo <= p <= hi for p in got) and len(set(got)) == 200
        for p in got:
            dep._ports_in_use.discard((remote, p))
        # a full slice is an error, never a port of another worker
        set_port_slice(0, (dep.PORT_HI - dep.PORT_LO + 1) // 3)  # slices of 3 ports
        three = [dep._allocate_port(remote) for _ in range(3)]
        assert sorted(three) == [dep.PORT_LO, dep.PORT_LO + 1, dep.PORT_LO + 2]
        with pytest.raises(TransportError, match="no free local DCCP port"):
            dep._allocate_port(remote)
        for p in three:
            dep._ports_in_use.discard((remote, p))
        for bad in ((4, 4), (-1, 2), (0, 0), (0, 10 ** 6)):
            with pytest.raises(ValueError):
                set_port_slice(*bad)
    finally:
        set_port_slice(0, 1)
    assert port_slice() == (dep.PORT_LO, dep.PORT_HI)
