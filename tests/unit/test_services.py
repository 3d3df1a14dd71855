"""``vstack.services`` on a real loop, real sockets (UDP management port on loopback, the
unix control socket), a real rule engine; the datapath is a stand-in Actuator (the
execution side is not what these tests are about)."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

from vstack.analysis.flowkey import FlowKey
from vstack.config import Config
from vstack.decision.events import Event
from vstack.execution.selector import Decision, FlowInfo
from vstack.log import NullSink
from vstack.management.auth import sign
from vstack.services import HistorySink, start_services

KEY = "unit-test-shared-key-0123456789abcdef"
FLOW = FlowKey.parse("udp:198.18.0.1:5000->10.201.1.2:9000")


class FakeDatapath:
    """The Actuator side: records what it is told, logs decisions like the Datapath."""

    def __init__(self) -> None:
        self.sink: Any = NullSink()
        self.on_failure: Any = None
        self.stack = "udp"
        self.target = "10.201.1.2:9000"
        self.calls: list[tuple[Any, ...]] = []

    def switch(self, flow: FlowKey, stack: str, options: Mapping[str, Any] | None = None,
               *, rule: str | None = None) -> None:
        if flow != FLOW:
            raise LookupError(f"no flow {flow}")
        self.calls.append(("switch", stack, rule))
        self.stack = stack
        self.sink.decision(flow, Decision(stack=stack, rule=rule), time.time())

    def use_interface(self, flow: FlowKey, ifname: str, *, rule: str | None = None) -> None:
        self.calls.append(("use_interface", ifname, rule))

    def retarget(self, flow: FlowKey, address: str, port: int | None,
                 *, rule: str | None = None) -> None:
        self.calls.append(("retarget", address, port, rule))
        self.target = f"{address}:{port}"

    def set_dscp(self, flow: FlowKey, dscp: int) -> None:
        pass

    def drop(self, flow: FlowKey) -> None:
        pass

    def flows(self) -> Iterable[FlowInfo]:
        return [FlowInfo(FLOW, self.stack, "", self.target, 1, 1, 10, 10, "r", 0.0, 0.0)]

    def stats(self) -> dict[str, Any]:
        return {"rx_packets": 1}


@pytest.fixture
def sockdir() -> Any:
    d = tempfile.mkdtemp(prefix="vsu-", dir="/tmp")
    yield Path(d)
    for p in Path(d).iterdir():
        p.unlink()
    os.rmdir(d)


def _cfg(sockdir: Path, mgmt: bool = True, rules: str = "") -> Config:
    cfg = Config()
    cfg.control.socket = str(sockdir / "c.sock")
    if mgmt:
        cfg.management.listen = "127.0.0.1:0"
        cfg.management.key = KEY
    cfg.decision.rules = rules
    return cfg


async def _call(path: str, method: str, **params: Any) -> dict[str, Any]:
    r, w = await asyncio.open_unix_connection(path)
    w.write(json.dumps({"id": 1, "method": method, "params": params}).encode() + b"\n")
    await w.drain()
    resp: dict[str, Any] = json.loads(await r.readline())
    w.close()
    await w.wait_closed()
    return resp


def _send(addr: tuple[str, int], key: str, msg: dict[str, Any]) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(sign(msg, key, time.time()), addr)


async def _until(pred: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def test_without_engine_mgmt_switch_acts_directly_and_forged_is_dropped(sockdir: Path) -> None:
    async def main() -> None:
        dp = FakeDatapath()
        svc = await start_services(_cfg(sockdir), dp)
        try:
            assert svc.monitor is None  # no rules: nothing would act on netlink events
            addr = svc.mgmt.address
            flow = str(FLOW)
            _send(addr, "forged-" + KEY, {"type": "switch", "flow": flow, "stack": "dccp"})
            _send(addr, KEY, {"type": "congestion", "link": "e1", "level": 0.9})
            await _until(lambda: svc.mgmt.counters["accepted"] == 1)
            _send(addr, KEY, {"type": "switch", "flow": flow, "stack": "dccp"})
            _send(addr, KEY, {"type": "retarget", "flow": flow, "target": "10.201.2.2:9100"})
            await _until(lambda: len(dp.calls) == 2)
            assert dp.calls == [("switch", "dccp", "mgmt"),
                                ("retarget", "10.201.2.2", 9100, "mgmt")]
            st = (await _call(svc.cfg.control.socket, "stats"))["result"]
            assert st["management"]["unauthenticated"] == 1
            assert st["management"]["accepted"] == 3
            assert st["management"]["handler_ignored"] == 1  # congestion: no rules
            assert st["management"]["handler_applied"] == 2
            fl = (await _call(svc.cfg.control.socket, "flows"))["result"]
            assert fl["flows"][0]["stack"] == "dccp"
            why = (await _call(svc.cfg.control.socket, "why", flow=flow))["result"]
            assert [(e["rule"], e["stack"]) for e in why["decisions"]] == [("mgmt", "dccp")]
            err = await _call(svc.cfg.control.socket, "rules_reload")
            assert not err["ok"] and "static selector" in err["error"]["message"]
            unknown = await _call(svc.cfg.control.socket, "why",
                                  flow="udp:1.2.3.4:1->5.6.7.8:2")
            assert not unknown["ok"] and unknown["error"]["type"] == "UnknownFlow"
        finally:
            await svc.close()
        assert not os.path.exists(svc.cfg.control.socket)

    asyncio.run(main())


def test_with_engine_rules_decide_reload_keeps_old_on_error(sockdir: Path) -> None:
    from vstack.decision.driver import EngineDriver
    from vstack.decision.engine import RulesFile

    rules = sockdir / "r.rules"
    rules.write_text('rule start: on flow.new if proto == "udp" then use_stack(udp)\n'
                     "rule m: on mgmt.switch then use_stack(stack)\n")

    async def main() -> None:
        dp = FakeDatapath()
        rf = RulesFile(str(rules))
        engine = rf.engine(dp, dp.sink, backend="reference")
        driver = EngineDriver(engine, rf)
        driver.start()
        svc = await start_services(_cfg(sockdir, rules=str(rules)), dp, engine, driver, None)
        try:
            assert svc.monitor is not None  # with rules, link events feed the engine
            assert engine.sink is dp.sink is svc.history
            d = engine.decide(Event("flow.new", time.time(), {"proto": "udp"}, FLOW), time.time())
            dp.sink.decision(FLOW, d, time.time())  # the datapath logs the same Decision
            _send(svc.mgmt.address, KEY, {"type": "switch", "flow": str(FLOW), "stack": "dccp"})
            await _until(lambda: dp.calls != [])
            assert dp.calls == [("switch", "dccp", "m")]
            ctl = svc.cfg.control.socket
            why = (await _call(ctl, "why", flow=str(FLOW)))["result"]
            # one entry per decision: flow.new once; the actuator's + the engine's record
            # of the switch merged (with the facts the rule saw)
            assert [(e["rule"], e["stack"]) for e in why["decisions"]] == [
                ("start", "udp"), ("m", "dccp")]
            assert why["decisions"][1]["facts"]["stack"] == "dccp"
            assert why["decisions"][0]["facts"]["proto"] == "udp"
            v0 = engine.rules_version

            rules.write_text("rule broken: on flow.new if dport == then drop()\n")
            bad = await _call(ctl, "rules_reload")
            assert not bad["ok"] and bad["error"]["type"] == "RulesReloadError"
            assert f"{rules}:1:" in bad["error"]["message"]
            assert f"kept rules version {v0}" in bad["error"]["message"]
            assert engine.rules_version == v0

            rules.write_text('rule new: on flow.new if proto == "udp" then use_stack(udp)\n')
            ok = (await _call(ctl, "rules_reload"))["result"]
            assert ok["previous"] == v0 and ok["version"] != v0 and ok["rules"] == 1
            st = (await _call(ctl, "stats"))["result"]
            assert st["engine"]["reload_errors"] == 1 and st["engine"]["reloads"] == 1
            assert "monitor" in st and "control" in st
        finally:
            await svc.close()
            driver.stop()

    asyncio.run(main())


def test_a_management_port_that_cannot_open_stops_the_daemon(sockdir: Path) -> None:
    async def main() -> None:
        import socket

        busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        busy.bind(("127.0.0.1", 0))
        cfg = _cfg(sockdir)
        cfg.management.listen = f"127.0.0.1:{busy.getsockname()[1]}"
        failures: list[str] = []
        dp = FakeDatapath()
        dp.on_failure = failures.append
        try:
            svc = await start_services(cfg, dp)
        finally:
            busy.close()
        assert len(failures) == 1 and "management.listen" in failures[0]
        assert svc.mgmt is None and svc.control is None
        await svc.close()

    asyncio.run(main())


def test_history_is_bounded_and_passes_everything_on() -> None:
    seen: list[Any] = []

    class Inner(NullSink):
        dropped = 7

        def decision(self, flow: FlowKey | None, decision: Decision, now: float) -> None:
            seen.append(decision)

    h = HistorySink(Inner(), per_flow=3, max_flows=2)
    keys = [FlowKey.parse(f"udp:10.0.0.1:{p}->10.0.0.2:9") for p in (1, 2, 3)]
    for i in range(5):
        h.decision(keys[0], Decision(stack="udp", rule=f"r{i}"), float(i))
    same = Decision(stack="dccp", rule="x")
    h.decision(keys[1], same, 10.0)
    h.decision(keys[1], same, 10.0)
    h.decision(keys[2], Decision(stack="udp"), 11.0)
    assert len(seen) == 8  # every call reached the inner sink
    assert h.history(keys[0]) is None  # the least recently decided flow was dropped
    assert [e["rule"] for e in h.history(keys[1]) or []] == ["x"]  # the same object once
    assert h.dropped == 7  # the inner sink's attributes show through
    h2 = HistorySink(None, per_flow=3)
    for i in range(5):
        h2.decision(keys[0], Decision(stack="udp", rule=f"r{i}"), float(i))
    assert [e["rule"] for e in h2.history(keys[0]) or []] == ["r2", "r3", "r4"]
