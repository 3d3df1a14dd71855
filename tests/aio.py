"""asyncio helpers shared by the tests: a loopback UDP echo and a bounded wait."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class Echo(asyncio.DatagramProtocol):
    """A UDP echo that records what it saw."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.seen.append(data)
        self.transport.sendto(data, addr)


async def until(cond: Callable[[], object], timeout: float = 10.0) -> None:
    """Wait on the running loop until ``cond()`` holds; fail the test after ``timeout``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.01)
