"""The asyncio adapter: engine timers on a real loop, reload on request and on file change.
No timing is asserted: each test waits (bounded) for the effect."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from vstack.analysis.flowkey import FlowKey
from vstack.decision.driver import EngineDriver
from vstack.decision.engine import RulesFile
from vstack.decision.events import Event

FLIP = """
rule start: on flow.new then use_stack(udp), start_timer(flip, 20ms, repeat=true)
rule to_dccp: on timer.flip if stack == "udp" then use_stack(dccp)
rule to_udp: on timer.flip if stack == "dccp" then use_stack(udp)
"""
K = FlowKey(17, "10.0.0.1", 5000, "10.0.0.2", 9000)


async def wait_for(cond: Callable[[], bool], limit: float = 10.0) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not cond():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.01)
    return True


def test_timers_run_on_the_loop_and_reload(tmp_path: Path) -> None:
    path = tmp_path / "flip.rules"
    path.write_text(FLIP)

    async def main() -> None:
        rf = RulesFile(str(path))
        engine = rf.engine(None, None, backend="durable")
        driver = EngineDriver(engine, rf, poll_s=0.02)
        driver.start()
        assert engine.next_timer() is None
        engine.decide(Event("flow.new", 0.0, {"proto": "udp"}, K), driver.clock())
        assert engine.next_timer() is not None  # armed by the rule, seen by the driver
        assert await wait_for(lambda: engine.stats["timers"] >= 3)
        assert engine.flow_state(K)["stack"] in ("udp", "dccp")  # type: ignore[index]
        assert engine.stats["fired:to_dccp"] >= 1 and engine.stats["fired:to_udp"] >= 1

        v1 = engine.rules_version
        path.write_text(FLIP.replace("20ms", "30ms") + "# v2\n")
        assert await wait_for(lambda: engine.rules_version != v1)  # polled file change
        v2 = engine.rules_version
        path.write_text("rule broken: on flow.new then\n")
        assert driver.reload() is False
        assert engine.rules_version == v2
        assert rf.last_error is not None and rf.last_error.startswith(f"{path}:1:")
        before = engine.stats["timers"]
        assert await wait_for(lambda: engine.stats["timers"] > before)  # timers go on
        driver.stop()
        engine.close()

    asyncio.run(main())
