"""The parent <-> worker links and the control fan-out (``vstack.workers``,
``vstack.services``) without root: each "worker" is a ``local_services`` over a stand-in
datapath, served by ``serve_link`` on one end of a real ``socketpair`` on the same loop;
the parent's ``Services`` fans out over ``WorkerLink``s on the other ends."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.aio import until
from vstack.analysis.flowkey import FlowKey
from vstack.config import Config
from vstack.control import ControlServer
from vstack.decision.events import Event
from vstack.execution.selector import Decision, FlowInfo
from vstack.log import NullSink
from vstack.services import (
    RulesReloadError,
    Services,
    UnknownFlow,
    local_services,
    merge_flows,
    merge_stats,
    sum_counters,
)
from vstack.workers import (
    WorkerError,
    WorkerLink,
    WorkerUnavailable,
    check_links,
    event_from_json,
    event_to_json,
    serve_link,
)


def _flow(port: int) -> FlowKey:
    return FlowKey.parse(f"udp:198.18.0.1:{port}->10.201.1.2:9000")


class FlowNotFound(LookupError):
    pass


class FakeDatapath:
    """One worker's Actuator: the flows it owns; records what it is told."""

    def __init__(self, ports: Iterable[int]) -> None:
        self.sink: Any = NullSink()
        self.on_failure: Any = None
        self.stacks = {_flow(p): "udp" for p in ports}
        self.calls: list[tuple[Any, ...]] = []

    def switch(self, flow: FlowKey, stack: str, options: Mapping[str, Any] | None = None,
               *, rule: str | None = None) -> None:
        if flow not in self.stacks:
            raise FlowNotFound(f"no flow {flow}")
        if stack not in ("udp", "dccp"):
            raise ValueError(f"unknown stack {stack!r}")
        self.calls.append(("switch", flow, stack, rule))
        self.stacks[flow] = stack
        self.sink.decision(flow, Decision(stack=stack, rule=rule), time.time())

    def retarget(self, flow: FlowKey, address: str, port: int | None,
                 *, rule: str | None = None) -> None:
        if flow not in self.stacks:
            raise FlowNotFound(f"no flow {flow}")
        self.calls.append(("retarget", flow, address, port, rule))

    def flow_info(self, flow: FlowKey) -> FlowInfo | None:
        return next((f for f in self.flows() if f.key == flow), None)

    def flows(self) -> list[FlowInfo]:
        return [FlowInfo(k, s, "", "10.201.1.2:9000", 1, 1, 10, 10, "r", 0.0, 0.0)
                for k, s in self.stacks.items()]

    def stats(self) -> dict[str, Any]:
        return {"rx_packets": 10 * len(self.stacks), "flows": len(self.stacks)}


class FakeEngine:
    def __init__(self, version: str = "v1") -> None:
        self.events: list[Event] = []
        self.rules_version = version
        self.stats: dict[str, int] = {"events": 0}
        self.sink: Any = None
        self.ruleset = type("RS", (), {"rules": [1, 2]})()

    def submit(self, ev: Event, now: float) -> int:
        self.events.append(ev)
        self.stats["events"] += 1
        return 0

    def timers(self) -> list[Any]:
        return []

    def flow_state(self, flow: FlowKey) -> Any:
        return None


class FakeDriver:
    """``driver.reload()`` of a rules file that is good or bad (``version``: what the
    file holds now, as ``RulesFile.load`` parses it)."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.good = True
        self.version = "v2"
        drv = self

        class Rules:
            path = "x.rules"
            last_error: str | None = None
            warnings: list[Any] = []

            def load(self) -> Any:
                if not drv.good:
                    raise ValueError("x.rules:2:7: expected a value")
                return type("RS", (), {"source_hash": drv.version, "rules": [1, 2]})()

        self.rules = Rules()
        engine.reload = lambda rs: setattr(engine, "rules_version", rs.source_hash)  # type: ignore[attr-defined]
        self.rearmed = 0

    def rearm(self) -> None:
        self.rearmed += 1

    def reload(self) -> bool:
        if not self.good:
            self.rules.last_error = "x.rules:2:7: expected a value"
            return False
        self.engine.rules_version = self.version
        return True


class Host:
    """A parent (worker 0) and ``len(ports)-1`` workers on socketpairs."""

    def __init__(self, ports: list[list[int]], engines: bool = False,
                 timeout: float = 2.0, rules: Any = None) -> None:
        self.dps = [FakeDatapath(p) for p in ports]
        self.engines: list[Any] = ([FakeEngine() for _ in ports] if engines
                                   else [None] * len(ports))
        self.drivers = [FakeDriver(e) if e is not None else None for e in self.engines]
        if rules is not None:  # real rule engines over the stand-in datapaths
            from vstack.decision.engine import RulesFile

            self.engines = [RulesFile(str(rules)).engine(dp, None, backend="reference")  # type: ignore[arg-type]
                            for dp in self.dps]
            self.drivers = [None] * len(ports)
        self.svcs = [local_services(Config(), dp, e, d, None)
                     for dp, e, d in zip(self.dps, self.engines, self.drivers, strict=True)]
        self.timeout = timeout
        self.tasks: list[asyncio.Task[None]] = []
        self.links: list[WorkerLink] = []
        self.worker_socks: list[socket.socket] = []

    async def __aenter__(self) -> Services:
        for wid, svc in enumerate(self.svcs[1:], start=1):
            a, b = socket.socketpair()
            server = ControlServer("", svc.link_handlers())
            self.tasks.append(asyncio.create_task(serve_link(b, server.dispatch)))
            self.links.append(WorkerLink(wid, a, 1000 + wid, self.timeout))
            self.worker_socks.append(b)
        parent = self.svcs[0]
        parent.workers = self.links
        return parent

    def submit_everywhere(self, parent: Services) -> Callable[[Event], None]:
        """What the daemon wires for its engine: worker 0's engine, then every worker."""
        local = self.engines[0]
        assert local is not None

        def to_local(ev: Event) -> None:
            local.submit(ev, ev.time)

        return parent.submit_everywhere(to_local)

    async def __aexit__(self, *exc: object) -> None:
        await self.svcs[0].close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


# ------------------------------------------------------------------------------ the link
def test_link_request_error_and_late_answers() -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        slow = asyncio.Event()

        async def dispatch(line: bytes) -> bytes:
            req = json.loads(line)
            if req["method"] == "slow":
                await slow.wait()
            if req["method"] == "boom":
                return json.dumps({"id": req["id"], "ok": False, "error": {
                    "type": "EngineError", "message": "no such stack"}}).encode() + b"\n"
            return json.dumps({"id": req["id"], "ok": True,
                               "result": req["params"]}).encode() + b"\n"

        task = asyncio.create_task(serve_link(b, dispatch))
        link = WorkerLink(3, a, 42, timeout=0.3)
        assert await link.request("echo", {"x": 1}) == {"x": 1}
        with pytest.raises(WorkerError) as ei:
            await link.request("boom")
        assert ei.value.kind == "EngineError" and ei.value.wid == 3
        with pytest.raises(WorkerUnavailable, match=r"did not answer 'slow' within 0\.3s"):
            await link.request("slow")
        slow.set()  # its answer comes late, and is dropped by id
        assert await link.request("echo", {"y": 2}) == {"y": 2}
        assert link.counters["late_answers"] == 1 and link.counters["timeouts"] == 1
        await link.close()
        with pytest.raises(WorkerUnavailable):
            await link.request("echo")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run(main())


def test_a_dead_worker_is_a_clear_error_not_a_hang() -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        b.close()  # the worker exited
        link = WorkerLink(1, a, 4242, timeout=5.0)
        with pytest.raises(WorkerUnavailable, match=r"worker 1 \(pid 4242\) is unavailable"):
            await link.request("flows")
        assert link.counters["timeouts"] == 0  # EOF, not the timeout
        assert link.dead is not None
        link.notify("event", {})  # counted, never raised
        assert link.counters["notes_dropped"] == 1

    run(main())


def _echo_server(hang: asyncio.Event | None = None) -> Any:
    async def dispatch(line: bytes) -> bytes:
        req = json.loads(line)
        if hang is not None and req["method"] != "free":
            await hang.wait()
        if req["method"] == "big":
            return json.dumps({"id": req["id"], "ok": True,
                               "result": "x" * 4000}).encode() + b"\n"
        if req["method"] == "garbage":
            return b'{"id": ' + str(req["id"]).encode() + b', "ok": tru\xff\n'
        if req["method"] == "noid":
            return b"\xff\xfe not json\n"
        return json.dumps({"id": req["id"], "ok": True,
                           "result": req["params"]}).encode() + b"\n"

    return dispatch


def test_an_over_long_or_undecodable_answer_fails_one_request_not_the_link() -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        task = asyncio.create_task(serve_link(b, _echo_server()))
        link = WorkerLink(2, a, 42, timeout=2.0, line_limit=1024)
        with pytest.raises(WorkerError) as ei:
            await link.request("big")
        assert ei.value.kind == "AnswerTooLong"
        assert await link.request("echo", {"n": 1}) == {"n": 1}  # resynced at the newline
        with pytest.raises(WorkerError) as ei:
            await link.request("garbage")
        assert ei.value.kind == "BadAnswer"
        with pytest.raises(WorkerError):
            await link.request("noid")
        assert await link.request("echo", {"n": 2}) == {"n": 2}
        assert link.dead is None and not task.done()  # the worker still serves
        assert link.counters["answers_too_long"] == 1 and link.counters["bad_answers"] == 2
        await link.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run(main())


def test_an_over_long_request_is_answered_and_skipped_by_the_worker() -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        task = asyncio.create_task(serve_link(b, _echo_server(), limit=1024))
        link = WorkerLink(2, a, 42, timeout=2.0)
        with pytest.raises(WorkerError) as ei:
            await link.request("echo", {"x": "y" * 5000})
        assert ei.value.kind == "RequestTooLong"
        assert await link.request("echo", {"n": 3}) == {"n": 3}
        assert not task.done()
        await link.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run(main())


def test_a_hung_worker_is_marked_unresponsive_and_notes_never_block_requests() -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        hang = asyncio.Event()
        task = asyncio.create_task(serve_link(b, _echo_server(hang)))
        link = WorkerLink(4, a, 44, timeout=0.2)
        for i in range(10):  # forwarded events: one way, no answer awaited
            link.notify("event", {"i": i})
        with pytest.raises(WorkerUnavailable, match="did not answer"):
            await link.request("stats")
        # the notes ahead of it cost no timeout (before: each held the link a round trip)
        assert link.counters["timeouts"] == 1 and link.counters["notes"] == 10
        with pytest.raises(WorkerUnavailable, match="did not answer"):
            await link.request("stats")
        assert link.unresponsive
        with pytest.raises(WorkerUnavailable, match="did not answer its last 2"):
            await link.request("stats")  # at once: not sent, no third timeout
        link.notify("event", {})
        assert link.counters["timeouts"] == 2 and link.counters["fast_fails"] == 1
        assert link.counters["notes_dropped"] == 1
        hang.set()  # it recovers: answers what it was sent, and is used again
        await until(lambda: not link.unresponsive and not link._notes)
        assert not link.unresponsive and link.counters["late_answers"] == 2
        assert await link.request("echo", {"ok": 1}) == {"ok": 1}
        assert link.dead is None
        await link.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run(main())


def test_flows_are_capped_with_the_total() -> None:
    async def main() -> None:
        async with Host([[5000, 5001, 5002], [6000, 6001], [7000]]) as parent:
            res = await parent.handlers()["flows"]({"limit": 4})
            assert len(res["flows"]) == 4 and res["total"] == 6 and res["truncated"]
            res = await parent.handlers()["flows"]({"limit": 1})
            assert len(res["flows"]) == 1 and res["total"] == 6 and res["truncated"]
            res = await parent.handlers()["flows"]({})
            assert len(res["flows"]) == 6 and res["total"] == 6 and "truncated" not in res
            with pytest.raises(ValueError, match="limit"):
                await parent.handlers()["flows"]({"limit": -1})

    run(main())


def test_flows_of_a_huge_table_build_only_the_first_limit() -> None:
    from vstack.control import actuator_handlers

    class HugeTable:
        def __len__(self) -> int:
            return 10**6

        def __iter__(self) -> Any:
            return (_flow(p % 65536) for p in range(10**6))

    class HugeDatapath(FakeDatapath):
        table = HugeTable()
        asked = 0

        def flows(self) -> list[FlowInfo]:
            raise AssertionError("every flow's view was built")

        def flow_info(self, flow: FlowKey) -> FlowInfo | None:
            self.asked += 1
            return FlowInfo(flow, "udp", "", "10.201.1.2:9000", 1, 1, 10, 10, "r", 0.0, 0.0)

    dp = HugeDatapath([])
    res = actuator_handlers(dp)["flows"]({"limit": 3})  # type: ignore[arg-type]
    assert len(res["flows"]) == 3 and res["total"] == 10**6 and res["truncated"]
    assert dp.asked == 3


def test_a_link_marked_dead_while_opening_fails_its_request_cleanly() -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        link = WorkerLink(5, a, 55, timeout=2.0)
        task = asyncio.create_task(link.request("stats"))
        await asyncio.sleep(0)  # the request is sent and waits for the link to open
        link.mark_dead("its process exited with status 1")
        # before: the opening was cancelled and the request raised CancelledError
        with pytest.raises(WorkerUnavailable, match="exited with status 1"):
            await task
        b.close()

    run(main())


@given(st.sampled_from(["mgmt.switch", "mgmt.congestion", "link.down"]),
       st.floats(0, 2e9), st.dictionaries(st.text(min_size=1, max_size=8),
                                          st.integers() | st.text(max_size=8), max_size=4),
       st.booleans())
def test_event_json_round_trip(etype: str, t: float, fields: dict[str, Any],
                               with_flow: bool) -> None:
    ev = Event(etype, t, fields, _flow(5000) if with_flow else None)
    back = event_from_json(json.loads(json.dumps(event_to_json(ev))))
    assert back == ev


@pytest.mark.parametrize("bad", [{"type": 1, "time": 0, "fields": {}},
                                 {"type": "x", "time": "now", "fields": {}},
                                 {"type": "x", "time": 0, "fields": []},
                                 {"type": "x", "time": 0, "fields": {}, "flow": "nonsense"}])
def test_bad_events_are_value_errors(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        event_from_json(bad)


# ----------------------------------------------------------------------------- fan-out
def test_flows_merge_all_workers_each_tagged() -> None:
    async def main() -> None:
        async with Host([[5000, 5001], [6000], [7000, 7001, 7002]]) as parent:
            res = await parent.handlers()["flows"]({})
            got = {(f["flow"], f["worker"]) for f in res["flows"]}
            assert got == {(str(_flow(5000)), 0), (str(_flow(5001)), 0),
                           (str(_flow(6000)), 1), (str(_flow(7000)), 2),
                           (str(_flow(7001)), 2), (str(_flow(7002)), 2)}
            assert res["workers"] == 3 and "unavailable" not in res

    run(main())


def test_switch_and_why_go_to_the_owner() -> None:
    async def main() -> None:
        h = Host([[5000], [6000], [7000]])
        async with h as parent:
            hd = parent.handlers()
            res = await hd["switch"]({"flow": str(_flow(7000)), "stack": "dccp"})
            assert res == {"flow": str(_flow(7000)), "stack": "dccp", "worker": 2}
            assert h.dps[2].calls == [("switch", _flow(7000), "dccp", "cli")]
            assert h.dps[0].calls == [] and h.dps[1].calls == []
            res = await hd["switch"]({"flow": str(_flow(5000)), "stack": "dccp"})
            assert res["worker"] == 0
            with pytest.raises(LookupError, match="no flow"):
                await hd["switch"]({"flow": str(_flow(9999)), "stack": "dccp"})
            with pytest.raises(WorkerError, match="unknown stack") as ei:  # not "not found"
                await hd["switch"]({"flow": str(_flow(6000)), "stack": "nope"})
            assert ei.value.kind == "ValueError"
            why = await hd["why"]({"flow": str(_flow(7000))})
            assert why["worker"] == 2 and why["live"]
            assert [(d["rule"], d["stack"]) for d in why["decisions"]] == [("cli", "dccp")]
            with pytest.raises(UnknownFlow):
                await hd["why"]({"flow": str(_flow(9999))})
            # through the control server's dispatch: the worker's error type is kept
            server = ControlServer("", hd)
            line = json.dumps({"id": 1, "method": "switch", "params": {
                "flow": str(_flow(6000)), "stack": "nope"}}).encode()
            resp = json.loads(await server.dispatch(line))
            assert resp["error"]["type"] == "ValueError"

    run(main())


def test_stats_per_worker_and_totals() -> None:
    async def main() -> None:
        async with Host([[5000], [6000, 6001], [7000, 7001, 7002]], engines=True) as parent:
            st_ = await parent.handlers()["stats"]({})
            assert st_["datapath"] == {"rx_packets": 60, "flows": 6}
            assert set(st_["workers"]) == {"0", "1", "2"}
            assert st_["workers"]["2"]["datapath"]["flows"] == 3
            assert st_["engine"]["rules_version"] == "v1"

    run(main())


def test_rules_reload_everywhere_or_nowhere() -> None:
    async def main() -> None:
        h = Host([[5000], [6000], [7000]], engines=True)
        async with h as parent:
            for d in h.drivers:
                assert d is not None
                d.good = False
            with pytest.raises(RulesReloadError, match=r"x.rules:2:7"):
                await parent.handlers()["rules_reload"]({})
            assert [e.rules_version for e in h.engines if e] == ["v1", "v1", "v1"]
            for d in h.drivers:
                assert d is not None
                d.good = True
            res = await parent.handlers()["rules_reload"]({})
            assert res["workers"] == {"0": "v2", "1": "v2", "2": "v2"}
            assert [e.rules_version for e in h.engines if e] == ["v2", "v2", "v2"]
            # worker 2's file was edited after the parent read it: refused there, and so
            # nowhere (before: the parent and worker 1 ran v3, worker 2 v4)
            for d in h.drivers:
                assert d is not None
                d.version = "v3"
            assert h.drivers[2] is not None
            h.drivers[2].version = "v4"
            with pytest.raises(RulesReloadError) as ei:
                await parent.handlers()["rules_reload"]({})
            msg = str(ei.value)
            assert "version v3 loaded nowhere" in msg and "kept rules version v2" in msg
            assert "worker 2: its rules file is version v4, not v3" in msg
            assert [e.rules_version for e in h.engines if e] == ["v2", "v2", "v2"]
            assert all(svc._prepared is None for svc in h.svcs)  # aborted everywhere
            # a failure in the last step (worker 1's engine cannot swap): named, per version
            h.drivers[2].version = "v3"
            e1 = h.engines[1]
            assert e1 is not None

            def broken(_rs: Any) -> None:
                raise RuntimeError("backend failed to compile")

            e1.reload = broken
            with pytest.raises(RulesReloadError) as ei:
                await parent.handlers()["rules_reload"]({})
            msg = str(ei.value)
            assert "loaded on worker(s) 0, 2" in msg and "NOT on worker 1" in msg
            assert "mixed rules" in msg
            assert [e.rules_version for e in h.engines if e] == ["v3", "v2", "v3"]

    run(main())


def test_events_reach_every_engine() -> None:
    async def main() -> None:
        h = Host([[5000], [6000], [7000]], engines=True)
        async with h as parent:
            submit = h.submit_everywhere(parent)
            ev = Event("mgmt.congestion", 123.0, {"link": "veth0", "level": 0.9})
            submit(ev)
            await until(lambda: all(e is not None and e.events for e in h.engines))
            assert [e.events for e in h.engines if e] == [[ev], [ev], [ev]]

    run(main())


def test_events_naming_a_flow_go_to_its_owner_only() -> None:
    async def main() -> None:
        h = Host([[5000], [6000], [7000]], engines=True)
        async with h as parent:
            submit = h.submit_everywhere(parent)
            on2 = Event("mgmt.switch", 1.0, {"stack": "dccp"}, _flow(7000))
            on0 = Event("mgmt.switch", 2.0, {"stack": "dccp"}, _flow(5000))
            nowhere = Event("mgmt.switch", 3.0, {"stack": "dccp"}, _flow(9999))
            for ev in (on2, on0, nowhere):
                submit(ev)
            await until(lambda: sum(parent.forwarding[k] for k in ("to_owner", "no_owner")) >= 3)
            # before: every engine got every event (a phantom flow and a failed action on
            # each non-owner)
            assert [e.events for e in h.engines if e] == [[on0], [], [on2]]
            assert parent.forwarding == {"to_owner": 2, "no_owner": 1}
            stats = await parent.handlers()["stats"]({})
            assert stats["forwarding"] == {"to_owner": 2, "no_owner": 1}
            assert stats["links"]["1"]["unresponsive"] is False

    run(main())


def test_a_flow_event_runs_rules_on_the_owner_only_with_real_engines(tmp_path: Any) -> None:
    rules = tmp_path / "r.rules"
    rules.write_text("rule m: on mgmt.switch then use_stack(stack)\n")

    async def main() -> None:
        h = Host([[5000], [6000], [7000]], rules=rules)
        async with h as parent:
            submit = h.submit_everywhere(parent)
            submit(Event("mgmt.switch", time.time(), {"stack": "dccp"}, _flow(7000)))
            await until(lambda: parent.forwarding["to_owner"])
            assert h.dps[2].calls == [("switch", _flow(7000), "dccp", "m")]
            assert h.dps[0].calls == [] and h.dps[1].calls == []
            # before: worker 0 and 1 made a phantom flow, ran the rule, and its action
            # failed with FlowNotFound there
            assert [e.stats["action_errors"] for e in h.engines] == [0, 0, 0]
            assert [e.stats["events"] for e in h.engines] == [0, 0, 1]

    run(main())


def test_mgmt_without_rules_goes_to_the_owner_only() -> None:
    async def main() -> None:
        h = Host([[5000], [6000], [7000]])
        async with h as parent:
            handler = parent.mgmt_handler
            assert handler is not None
            submit = parent.submit_everywhere(handler)
            submit(Event("mgmt.switch", 1.0, {"flow": str(_flow(6000)), "stack": "dccp"},
                         _flow(6000)))
            submit(Event("mgmt.switch", 1.0, {"flow": str(_flow(9999)), "stack": "dccp"},
                         _flow(9999)))
            c = handler.counters
            await until(lambda: c["applied"] + c["errors"] >= 2)
            assert h.dps[1].calls == [("switch", _flow(6000), "dccp", "mgmt")]
            assert h.dps[0].calls == [] and h.dps[2].calls == []
            assert handler.counters["applied"] == 1 and handler.counters["errors"] == 1
            # the other workers were asked and said "not mine": nothing counted there
            assert not h.svcs[2].mgmt_handler or not h.svcs[2].mgmt_handler.counters["errors"]

    run(main())


def test_a_dead_worker_leaves_the_rest_answering() -> None:
    async def main() -> None:
        h = Host([[5000], [6000], [7000]])
        async with h as parent:
            h.tasks[0].cancel()  # worker 1 exits: its end closes
            await asyncio.gather(h.tasks[0], return_exceptions=True)
            h.worker_socks[0].close()
            res = await parent.handlers()["flows"]({})
            assert {f["worker"] for f in res["flows"]} == {0, 2}
            assert "worker 1 (pid 1001) is unavailable" in res["unavailable"]["1"]
            st_ = await parent.handlers()["stats"]({})
            assert "1" in st_["unavailable"] and set(st_["workers"]) == {"0", "2"}
            with pytest.raises(LookupError, match="worker 1"):
                await parent.handlers()["switch"]({"flow": str(_flow(6000)), "stack": "dccp"})

    run(main())


def test_merge_helpers() -> None:
    assert sum_counters([{"a": 1, "v": "x", "n": {"b": 2}}, {"a": 2, "v": "x", "n": {"b": 3}},
                         {"a": 0.5, "v": "y"}]) == {"a": 3.5, "v": ["x", "x", "y"],
                                                    "n": {"b": 5}}
    out = merge_flows({0: {"flows": [{"flow": "f"}], "log_dropped": 2},
                       1: WorkerUnavailable("gone"), 2: {"flows": [], "log_dropped": 1}})
    assert out == {"flows": [{"flow": "f", "worker": 0}], "workers": 3, "log_dropped": 3,
                   "total": 1, "unavailable": {"1": "gone"}}
    st_ = merge_stats({"uptime_s": 1, "datapath": {"x": 1}, "control": {"requests": 1},
                       "log": {"run_id": 7, "written": 2}},
                      {0: {"datapath": {"x": 1}, "log": {"run_id": 7, "written": 2}},
                       1: {"datapath": {"x": 4}, "log": {"run_id": 1, "written": 3}}})
    assert st_["datapath"] == {"x": 5} and st_["control"] == {"requests": 1}
    # the configured log stays the parent's (its run id), the sums are beside it
    assert st_["log"] == {"run_id": 7, "written": 2}
    assert st_["log_total"] == {"run_id": [7, 1], "written": 5}
    assert sum_counters([{"run_id": 3}, {"run_id": 3}]) == {"run_id": 3}


def test_check_links_names_a_worker_that_died_while_starting() -> None:
    async def main() -> None:
        h = Host([[5000], [6000], [7000]])
        async with h:
            assert await check_links(h.links, timeout=2.0) is None
            h.tasks[1].cancel()  # worker 2 exits
            await asyncio.gather(h.tasks[1], return_exceptions=True)
            h.worker_socks[1].close()
            msg = await check_links(h.links, timeout=2.0)
            assert msg is not None and "worker 2 (pid 1002)" in msg and "did not start" in msg

    run(main())


def test_a_worker_that_exits_is_noticed_marked_dead_and_reaped() -> None:
    import os
    import signal as sig

    from vstack.workers import Workers

    async def main() -> None:
        pid = os.posix_spawn("/bin/sleep", ["sleep", "60"], dict(os.environ))
        a, b = socket.socketpair()
        ws = Workers([pid], [a])
        try:
            ws.watch()
            link = ws.links()[0]
            os.kill(pid, sig.SIGKILL)
            # no request needed: the watch sees the exit
            await until(lambda: link.dead is not None)
            assert link.dead is not None and "killed by signal 9" in link.dead
            assert ws.exited == {pid: "killed by signal 9"} and ws.pids == []
            with pytest.raises(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # reaped: no zombie left
            with pytest.raises(WorkerUnavailable, match="killed by signal 9"):
                await link.request("stats")
        finally:
            ws.stop(timeout=1.0)
            b.close()

    run(main())


def test_spawn_failing_midway_stops_the_workers_already_forked(monkeypatch: Any) -> None:
    import os

    import vstack.workers as workers
    from vstack.dccp import endpoint

    class FakeQueue:
        name, vnet_hdr, closed = "vsq0", False, False

        def close(self) -> None:
            self.closed = True

    made: list[FakeQueue] = []

    def fake_open_tun(*_a: Any, **_k: Any) -> FakeQueue:
        made.append(FakeQueue())
        return made[-1]

    child = os.posix_spawn("/bin/sleep", ["sleep", "60"], dict(os.environ))
    forks = iter([child])

    def fake_fork() -> int:
        pid = next(forks, None)
        if pid is None:
            raise OSError(11, "Resource temporarily unavailable")
        return pid

    monkeypatch.setattr(workers, "open_tun", fake_open_tun)
    monkeypatch.setattr(os, "fork", fake_fork)
    try:
        with pytest.raises(OSError, match="temporarily unavailable"):
            workers.spawn(Config(), None, FakeQueue(), 3)  # type: ignore[arg-type]
    finally:
        endpoint.set_port_slice(0, 1)
    with pytest.raises(ChildProcessError):  # the forked one was stopped and reaped
        os.waitpid(child, os.WNOHANG)
    assert len(made) == 2 and all(q.closed for q in made)


def test_default_workers_is_capped(monkeypatch: Any) -> None:
    import os

    from vstack.workers import check_workers, default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(1000)))
    assert default_workers() == 256 == check_workers(default_workers())


def test_only_a_worker_error_keeps_its_kind() -> None:
    class Odd(Exception):
        kind = "Spoofed"

    def boom(_p: dict[str, Any]) -> Any:
        raise Odd("x")

    def worker_boom(_p: dict[str, Any]) -> Any:
        raise WorkerError(1, "FlowNotFound", "no flow")

    server = ControlServer("", {"boom": boom, "wboom": worker_boom})

    async def main() -> tuple[Any, Any]:
        r1 = json.loads(await server.dispatch(b'{"id": 1, "method": "boom"}'))
        r2 = json.loads(await server.dispatch(b'{"id": 2, "method": "wboom"}'))
        return r1, r2

    r1, r2 = run(main())
    assert r1["error"]["type"] == "Odd" and r2["error"]["type"] == "FlowNotFound"


def test_vstack_run_defaults_to_one_worker_per_core(tmp_path: Any) -> None:
    import os

    from vstack.cli.daemon import load_config
    from vstack.workers import default_workers

    assert default_workers() == len(os.sched_getaffinity(0))
    assert load_config(None, None).vnic.queues == default_workers()
    f = tmp_path / "v.toml"
    f.write_text('[vnic]\nqueues = 1\n')
    assert load_config(f, None).vnic.queues == 1  # --workers 1: the plain daemon
    f.write_text('[vnic]\nqueues = 0\n')
    assert load_config(f, None).vnic.queues == default_workers()
