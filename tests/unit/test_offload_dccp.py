"""DccpStack.send_many (issue 6): a batch stops asking the connection after the first
refusal of a datagram that fits (its queue is full), counting the rest as drops; an
oversize datagram is refused alone."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from vstack.execution.stacks.base import StackContext
from vstack.execution.stacks.dccp import DccpStack


class _Client:
    def __init__(self, room: int) -> None:
        self.room = room
        self.calls: list[bytes] = []
        self.is_open = True
        self.conn = SimpleNamespace(config=SimpleNamespace(mps=100))

    def send(self, data: Any) -> bool:
        self.calls.append(bytes(data))
        if len(data) > 100 or self.room == 0:
            return False
        self.room -= 1
        return True

    def send_many(self, datas: list[Any]) -> int:  # as DccpClient: stops at a refusal
        n = 0
        for d in datas:
            if not self.send(d):
                break
            n += 1
        return n


def _stack(room: int) -> tuple[DccpStack, _Client]:
    loop = asyncio.new_event_loop()
    ctx = StackContext(loop=loop, family=4, target=("127.0.0.1", 1), deliver=lambda _b: None,
                       on_error=lambda _e: None)
    st = DccpStack(ctx)
    c = _Client(room)
    st.client = c  # type: ignore[assignment]
    loop.close()
    return st, c


def test_batch_stops_at_a_full_queue() -> None:
    st, c = _stack(3)
    st.send_many([memoryview(bytes([i]) * 50) for i in range(10)])
    assert len(c.calls) == 4  # three accepted, one refused, six never asked
    assert (st.metrics.packets_out, st.metrics.bytes_out, st.metrics.drops) == (3, 150, 7)


def test_oversize_is_refused_alone() -> None:
    st, c = _stack(5)
    st.send_many([memoryview(b"a" * 50), memoryview(b"b" * 200), memoryview(b"c" * 50)])
    assert [len(x) for x in c.calls] == [50, 200, 50]
    assert (st.metrics.packets_out, st.metrics.drops) == (2, 1)


def test_dccp_udp_batches_keep_every_packet_and_its_boundaries() -> None:
    import socket

    from vstack.dccp.transport import UdpDccpSocket

    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(2)
    port = rx.getsockname()[1]
    tx = UdpDccpSocket(socket.AF_INET, bind="127.0.0.1")
    try:
        # DCCP-ish packets (checksum field zero): runs of equal size, shorter ends, sizes up
        datas = ([bytes([i]) * 6 + b"\0\0" + bytes([i]) * 92 for i in range(10)]
                 + [b"\x0a" * 6 + b"\0\0" + b"\x0a" * 40]
                 + [bytes([20 + i]) * 6 + b"\0\0" + bytes([20 + i]) * 192 for i in range(5)]
                 + [b"\x30" * 6 + b"\0\0" + b"\x30" * 4])
        assert tx.sendto_many(datas, "127.0.0.1", port) == len(datas)
        got = [rx.recv(2048) for _ in datas]
        assert got == datas
        assert tx.stats.tx_gso >= 2  # the two runs went as GSO sends
        assert tx.stats.tx == len(datas)
    finally:
        tx.close()
        rx.close()
