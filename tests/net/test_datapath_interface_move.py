"""use_interface supersedes the flow's cached stacks (root: SO_BINDTODEVICE): after a move
the old DCCP connection and UDP socket are closed, not left retransmitting on the old
link, and traffic goes on over the new interface."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.aio import until as _until
from tests.unit.test_engine_stack_cache import Bed
from vstack.execution import engine as engine_mod


@pytest.mark.root
def test_use_interface_closes_the_superseded_stacks(monkeypatch: Any) -> None:
    monkeypatch.setattr(engine_mod, "RETIRE_S", 0.05)

    async def main() -> None:
        b = await Bed().start()
        try:
            await b.round_trip(b"a")
            b.dp.switch(b.key, "dccp")
            await b.round_trip(b"b")
            b.dp.switch(b.key, "udp")
            e = b.engine()
            old_udp, old_dccp = e.stacks["udp"], e.stacks["dccp"]
            b.dp.use_interface(b.key, "lo", rule="move")
            assert set(e.stacks) == {"udp"} and e.active is not old_udp
            assert e.active.ctx.interface == "lo"
            await _until(lambda: not e.retiring)
            assert old_dccp._closed and old_udp._sock is None
            await b.round_trip(b"c")
            b.dp.switch(b.key, "dccp")  # a fresh DCCP connection, bound to lo
            assert e.active is not old_dccp and e.active.ctx.interface == "lo"
            await b.round_trip(b"d")
        finally:
            b.close()
    asyncio.run(main())
