"""The decision engine: decide(), submit(), anti-flapping, sans-IO timers, reload,
exploration and action errors. The ``Actuator`` is the datapath's; a recording fake
stands in for it here. Both backends run every test."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

from vstack.analysis.flowkey import FlowKey
from vstack.decision.engine import DecisionEngine, RulesFile
from vstack.decision.events import Event
from vstack.decision.parser import parse_rules
from vstack.execution.selector import Decision, FlowInfo

RULES_DIR = Path(__file__).resolve().parents[2] / "rules"
BACKENDS = ["durable", "reference"]

F1 = FlowKey(17, "10.0.0.1", 5000, "10.201.1.2", 9000)
F2 = FlowKey(17, "10.0.0.1", 5001, "10.201.1.3", 9000)
F3 = FlowKey(6, "10.0.0.1", 5002, "10.201.1.4", 80)


class FakeActuator:
    """Records calls and keeps a flow table like the execution engine's."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.table: dict[FlowKey, dict[str, str]] = {}
        self.fail: set[str] = set()
        self.listed = 0  # flows() calls

    def add(self, key: FlowKey, d: Decision) -> None:
        self.table[key] = {"stack": d.stack or "udp", "iface": d.interface or ""}

    def _maybe_fail(self, what: str) -> None:
        if what in self.fail:
            raise RuntimeError(f"{what} exploded")

    def switch(self, flow: FlowKey, stack: str, options: Mapping[str, Any] | None = None,
               *, rule: str | None = None) -> None:
        self._maybe_fail("switch")
        self.calls.append(("switch", flow, stack, rule))
        self.table[flow]["stack"] = stack

    def use_interface(self, flow: FlowKey, ifname: str, *, rule: str | None = None) -> None:
        self._maybe_fail("use_interface")
        self.calls.append(("use_interface", flow, ifname, rule))
        self.table[flow]["iface"] = ifname

    def retarget(self, flow: FlowKey, address: str, port: int | None,
                 *, rule: str | None = None) -> None:
        self.calls.append(("retarget", flow, address, port, rule))

    def set_dscp(self, flow: FlowKey, dscp: int) -> None:
        self.calls.append(("set_dscp", flow, dscp))

    def drop(self, flow: FlowKey) -> None:
        self.calls.append(("drop", flow))
        self.table.pop(flow, None)

    def flows(self) -> Iterable[FlowInfo]:
        self._maybe_fail("flows")
        self.listed += 1
        return [FlowInfo(k, v["stack"], v["iface"], "", 0, 0, 0, 0, "", 0.0, 0.0)
                for k, v in self.table.items()]

    def switches(self) -> list[tuple[FlowKey, str]]:
        return [(c[1], c[2]) for c in self.calls if c[0] == "switch"]


class LookupActuator(FakeActuator):
    """Like the Datapath: also answers ``flow_info(key)`` in O(1)."""

    def __init__(self) -> None:
        super().__init__()
        self.looked_up = 0

    def flow_info(self, flow: FlowKey) -> FlowInfo | None:
        self._maybe_fail("flows")
        self.looked_up += 1
        v = self.table.get(flow)
        return None if v is None else FlowInfo(flow, v["stack"], v["iface"], "", 0, 0, 0, 0,
                                               "", 0.0, 0.0)


class RecordingSink:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.decisions: list[tuple[FlowKey | None, Decision, float]] = []

    def event(self, event: Event) -> None:
        self.events.append(event)

    def decision(self, flow: FlowKey | None, decision: Decision, now: float) -> None:
        self.decisions.append((flow, decision, now))

    def outcome(self, flow: FlowKey, stack: str, now: float, metrics: Mapping[str, Any]) -> None:
        pass

    def flow_seen(self, flow: FlowKey, features: Mapping[str, Any], now: float) -> None:
        pass

    def close(self) -> None:
        pass


def new_event(key: FlowKey, now: float = 0.0, **extra: Any) -> Event:
    fields = {"flow": str(key), "proto": key.proto_name, "family": 4, "src": key.src,
              "dst": key.dst, "sport": key.sport, "dport": key.dport, "dscp": 0,
              "tcp_flags": "", "length": 200, "payload_len": 172, "iface": "", "stack": ""}
    fields.update(extra)
    return Event("flow.new", now, fields, key)


def make(src: str, backend: str, **kw: Any) -> tuple[DecisionEngine, FakeActuator,
                                                     RecordingSink]:
    act, sink = FakeActuator(), RecordingSink()
    eng = DecisionEngine(parse_rules(src, "t.rules"), act, sink, backend=backend, **kw)
    return eng, act, sink


def start(eng: DecisionEngine, act: FakeActuator, key: FlowKey, now: float = 0.0,
          **extra: Any) -> Decision:
    d = eng.decide(new_event(key, now, **extra), now)
    act.add(key, d)
    return d


@pytest.mark.parametrize("backend", BACKENDS)
def test_decide_highest_priority_wins_each_slot(backend: str) -> None:
    eng, _, sink = make("""
        rule base: on flow.new if proto == "udp" then use_stack(udp), set_dscp(10)
        rule media priority 5: on flow.new if dport == 9000 then use_stack(dccp, ccid=2)
        rule nat priority 1: on flow.new if dst == 10.201.1.2 then retarget(10.9.9.9:7000)
        rule pin: on flow.new then use_interface(veth1), log("new", flow)
    """, backend)
    d = eng.decide(new_event(F1), 0.0)
    assert d.stack == "dccp"
    assert d.rule == "media"
    assert d.options == {"ccid": 2}
    assert d.target == ("10.9.9.9", 7000)
    assert d.dscp == 10
    assert d.interface == "veth1"
    assert d.drop is False
    assert d.rules_version == eng.rules_version and len(d.rules_version) == 12
    assert d.facts["dport"] == 9000 and d.facts["proto"] == "udp"
    assert (d.propensity, d.explored) == (1.0, False)
    assert sink.events[0].type == "flow.new"
    assert sink.decisions[0][0] == F1 and sink.decisions[0][1] is d
    d2 = eng.decide(new_event(F2, dport=53), 0.0)
    assert (d2.stack, d2.rule, d2.target) == ("udp", "base", None)
    assert eng.stats["logs"] == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_match_gives_default_decision(backend: str) -> None:
    eng, _, _ = make('rule a: on flow.new if proto == "tcp" then use_stack(tcp)', backend)
    d = eng.decide(new_event(F1), 0.0)
    assert d.stack is None and d.rule is None and not d.drop
    assert d.rules_version == eng.rules_version


@pytest.mark.parametrize("backend", BACKENDS)
def test_paper_rules_switch_every_5s_by_timer(backend: str) -> None:
    act, sink = FakeActuator(), RecordingSink()
    eng = RulesFile(str(RULES_DIR / "paper.rules")).engine(act, sink, backend=backend)
    assert eng.next_timer() is None
    d = start(eng, act, F1, 0.3)
    assert d.stack == "udp"
    assert eng.next_timer() == pytest.approx(5.3)
    start(eng, act, F2, 1.0)  # a second flow does not push the timer back
    assert eng.next_timer() == pytest.approx(5.3)
    eng.handle_timer(5.0)  # not yet due
    assert act.switches() == []
    seen = []
    for t in (5.3, 10.3, 15.3, 20.3):
        assert eng.next_timer() == pytest.approx(t)
        eng.handle_timer(t)
        seen.append((act.table[F1]["stack"], act.table[F2]["stack"]))
    assert seen == [("dccp", "dccp"), ("udp", "udp"), ("dccp", "dccp"), ("udp", "udp")]
    assert [c[3] for c in act.calls[:2]] == ["flip_to_dccp", "flip_to_dccp"]
    assert eng.stats["timers"] == 4
    assert any(dec.stack == "dccp" and dec.rule == "flip_to_dccp" for _, dec, _ in sink.decisions)


@pytest.mark.parametrize("backend", BACKENDS)
def test_timer_late_skips_missed_periods_and_one_shot_and_stop(backend: str) -> None:
    eng, _, _ = make("""
        rule go: on flow.new then start_timer(tick, 1s, repeat=true), start_timer(once, 2s)
        rule t: on timer.tick then log("tick")
        rule o: on timer.once then log("once"), stop_timer(tick)
    """, backend)
    eng.decide(new_event(F1), 0.0)
    assert eng.timers() == {"tick": (1.0, 1.0), "once": (2.0, None)}
    eng.handle_timer(3.5)  # late: tick fires once, then is due at 4.5; once fires, stops tick
    assert eng.stats["timers"] == 2
    assert eng.timers() == {}
    assert eng.next_timer() is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_for_needs_the_condition_to_hold_continuously(backend: str) -> None:
    eng, act, _ = make("""
        rule start: on flow.new then use_stack(udp)
        rule lossy: on flow.metrics if loss > 0.1 for 2s then use_stack(dccp)
    """, backend)
    start(eng, act, F1)

    def metrics(t: float, loss: float) -> None:
        eng.submit(Event("flow.metrics", t, {"loss": loss}, F1), t)

    metrics(0.0, 0.5)
    metrics(1.0, 0.5)
    metrics(1.5, 0.0)  # broken: the clock restarts
    metrics(2.0, 0.5)
    metrics(3.9, 0.5)
    assert act.switches() == []
    metrics(4.0, 0.5)
    assert act.switches() == [(F1, "dccp")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_at_most_once_per_interval_per_flow(backend: str) -> None:
    eng, act, _ = make("""
        rule start: on flow.new then use_stack(udp)
        rule up: on flow.metrics if loss > 0.1 then use_stack(dccp) at most once per 5s
        rule down: on flow.metrics if loss <= 0.1 then use_stack(udp) at most once per 5s
    """, backend)
    start(eng, act, F1)
    start(eng, act, F2)
    for i in range(12):  # loss flaps every second on both flows
        t = float(i)
        for k in (F1, F2):
            eng.submit(Event("flow.metrics", t, {"loss": 0.5 if i % 2 == 0 else 0.0}, k), t)
    f1 = [s for k, s in act.switches() if k == F1]
    f2 = [s for k, s in act.switches() if k == F2]
    # t=0 up; t=1 down; t=2..4 blocked (up at 0); t=6 up again; t=7 down; t=11 down? no:
    # up fires at 0, 6 (10 would be < 5s after 6? 10-6=4 -> blocked); down at 1, 7
    assert f1 == ["dccp", "udp", "dccp", "udp"]
    assert f2 == f1  # per flow, not shared


@pytest.mark.parametrize("backend", BACKENDS)
def test_link_down_moves_only_flows_pinned_to_that_link(backend: str) -> None:
    eng, act, _ = make("""
        rule pin_a: on flow.new if dport == 9000 and dst == 10.201.1.2 then use_interface(veth0)
        rule pin_b: on flow.new if dst == 10.201.1.3 then use_interface(veth1)
        rule note: on link.down then log("link down", ifname)
        rule leave0: on link.down if ifname == "veth0" then use_interface(veth1)
        rule leave1: on link.down if ifname == "veth1" then use_interface(veth0)
    """, backend)
    start(eng, act, F1)
    start(eng, act, F2)
    start(eng, act, F3)  # left to routing: iface ""
    n = eng.submit(Event("link.down", 1.0, {"ifname": "veth0", "index": 3}), 1.0)
    assert n == 2  # one use_interface + one log
    assert [c for c in act.calls if c[0] == "use_interface"] == [
        ("use_interface", F1, "veth1", "leave0")]
    assert act.table[F2]["iface"] == "veth1" and act.table[F3]["iface"] == ""
    assert eng.stats["logs"] == 1  # the flowless rule ran once, not per flow


@pytest.mark.parametrize("backend", BACKENDS)
def test_management_switch_and_congestion(backend: str) -> None:
    act, sink = FakeActuator(), RecordingSink()
    eng = RulesFile(str(RULES_DIR / "default.rules")).engine(act, sink, backend=backend)
    start(eng, act, F1)
    start(eng, act, F2)
    assert act.table[F1]["stack"] == "udp"
    eng.submit(Event("mgmt.switch", 1.0, {"flow": str(F1), "stack": "dccp"}), 1.0)
    assert act.switches() == [(F1, "dccp")]
    eng.submit(Event("mgmt.switch", 1.0, {"flow": "not a flow", "stack": "dccp"}), 1.0)
    assert eng.stats["bad_events"] == 1
    eng.submit(Event("mgmt.congestion", 2.0, {"link": "veth0", "level": 0.9}), 2.0)
    assert act.switches() == [(F1, "dccp"), (F2, "dccp")]  # F1 is already on dccp
    eng.submit(Event("mgmt.retarget", 3.0, {"flow": str(F2), "target": "10.7.7.7:99"}), 3.0)
    assert ("retarget", F2, "10.7.7.7", 99, "mgmt_retarget") in act.calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_rules_loss_moves_udp_to_dccp_after_2s(backend: str) -> None:
    act = FakeActuator()
    eng = RulesFile(str(RULES_DIR / "default.rules")).engine(act, None, backend=backend)
    start(eng, act, F1)
    for i in range(5):
        t = i * 0.5
        eng.submit(Event("flow.metrics", t, {"loss": 0.05, "rtt_ms": -1.0}, F1), t)
    assert act.switches() == [(F1, "dccp")]  # at t=2.0
    assert eng.flow_state(F1)["stack"] == "dccp"  # type: ignore[index]


@pytest.mark.parametrize("backend", BACKENDS)
def test_exception_in_action_is_logged_and_counted(backend: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    eng, act, _ = make("""
        rule start: on flow.new then use_stack(udp)
        rule up: on flow.metrics if loss > 0.1 then use_stack(dccp), set_dscp(46)
        rule bad: on mgmt.retarget then retarget(target)
    """, backend)
    start(eng, act, F1)
    act.fail.add("switch")
    with caplog.at_level(logging.ERROR, logger="vstack.decision"):
        n = eng.submit(Event("flow.metrics", 1.0, {"loss": 0.5}, F1), 1.0)
    assert n == 1  # set_dscp still ran
    assert eng.stats["action_errors"] == 1
    assert "switch exploded" in caplog.text
    # a bad dynamic argument is counted too, and never raises
    eng.submit(Event("mgmt.retarget", 2.0, {"flow": str(F1), "target": "nonsense"}), 2.0)
    assert eng.stats["action_errors"] == 2
    act.fail.clear()
    eng.submit(Event("flow.metrics", 3.0, {"loss": 0.5}, F1), 3.0)
    assert act.switches() == [(F1, "dccp")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_forgets_the_flow(backend: str) -> None:
    eng, act, _ = make("""
        rule start: on flow.new then use_stack(udp)
        rule kill: on flow.idle if idle_s > 30 then drop()
    """, backend)
    start(eng, act, F1)
    eng.submit(Event("flow.idle", 40.0, {"idle_s": 31.0}, F1), 40.0)
    assert ("drop", F1) in act.calls
    assert eng.flow_state(F1) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_reload_swaps_and_bad_reload_keeps_old_rules(backend: str, tmp_path: Path) -> None:
    path = tmp_path / "r.rules"
    path.write_text("rule a: on flow.new then use_stack(udp)\n")
    rf = RulesFile(str(path))
    eng = rf.engine(None, None, backend=backend)
    v1 = eng.rules_version
    assert eng.decide(new_event(F1), 0.0).stack == "udp"
    assert not rf.changed()

    path.write_text("rule a: on flow.new then use_stack(dccp)\n")
    assert rf.changed()
    assert rf.reload(eng) is True
    assert eng.rules_version != v1
    assert eng.decide(new_event(F2), 0.0).stack == "dccp"
    v2 = eng.rules_version

    path.write_text("rule a: on flow.new then use_stack(dccp\n")  # syntax error
    assert rf.reload(eng) is False
    assert rf.last_error is not None and rf.last_error.startswith(f"{path}:1:")
    assert eng.rules_version == v2
    assert eng.decide(new_event(F3), 0.0).stack == "dccp"
    assert not rf.changed()  # the bad file is not retried until it changes again

    path.write_text("rule a: on flow.new then use_stack(carrier_pigeon)\n")  # check error
    assert rf.reload(eng) is False
    assert rf.last_error.startswith(f"{path}:1:36: error: unknown stack")
    assert eng.rules_version == v2
    assert eng.stats["reload_errors"] == 2
    assert eng.stats["reloads"] == 1


def test_durable_reload_frees_the_old_ruleset() -> None:
    eng = DecisionEngine(parse_rules("rule a: on flow.new then use_stack(udp)"), None, None)
    old = eng._c.backend
    assert old._handle is not None
    eng.reload(parse_rules("rule a: on flow.new then use_stack(dccp)"))
    assert old._handle is None
    assert eng._c.backend.ruleset_name != old.ruleset_name
    assert eng.decide(new_event(F1), 0.0).stack == "dccp"
    eng.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_exploration_logs_propensity(backend: str) -> None:
    src = """
        rule base: on flow.new then use_stack(udp)
        rule alt: on flow.metrics if loss > 0.5 then use_stack(dccp)
    """
    eng, _, _ = make(src, backend, exploration=0.2, seed=7)
    ds = [eng.decide(new_event(FlowKey(17, "10.0.0.1", 1000 + i, "10.0.0.2", 9)), 0.0)
          for i in range(400)]
    explored = [d for d in ds if d.explored]
    kept = [d for d in ds if not d.explored]
    assert 10 < len(explored) < 80  # about 0.2 * 1/2 * 400 = 40
    assert all(d.stack == "dccp" and d.propensity == pytest.approx(0.1) for d in explored)
    assert all(d.stack == "udp" and d.propensity == pytest.approx(0.9) for d in kept)
    assert eng.stats["explored"] == len(explored)
    # the same seed explores the same flows
    eng2, _, _ = make(src, backend, exploration=0.2, seed=7)
    ds2 = [eng2.decide(new_event(FlowKey(17, "10.0.0.1", 1000 + i, "10.0.0.2", 9)), 0.0)
           for i in range(400)]
    assert [d.stack for d in ds2] == [d.stack for d in ds]


def test_bad_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="exploration"):
        DecisionEngine(parse_rules("rule a: on flow.new then use_stack(udp)"), None, None,
                       exploration=2.0)
    with pytest.raises(ValueError, match="backend"):
        DecisionEngine(parse_rules("rule a: on flow.new then use_stack(udp)"), None, None,
                       backend="prolog")


@pytest.mark.parametrize("backend", BACKENDS)
def test_action_decisions_logged_unless_turned_off_and_timer_hook(backend: str) -> None:
    src = """
        rule start: on flow.new then use_stack(udp), start_timer(t, 1s)
        rule up: on flow.metrics if loss > 0.1 then use_stack(dccp)
    """
    eng, act, sink = make(src, backend)
    changes: list[float | None] = []
    eng.on_timers_changed = lambda: changes.append(eng.next_timer())
    start(eng, act, F1)
    assert changes == [1.0]
    eng.submit(Event("flow.metrics", 0.5, {"loss": 0.5}, F1), 0.5)
    logged = [d for k, d, _ in sink.decisions if k == F1 and d.stack == "dccp"]
    assert len(logged) == 1
    assert logged[0].rule == "up" and logged[0].rules_version == eng.rules_version
    assert logged[0].facts["loss"] == 0.5
    eng.handle_timer(1.0)
    assert changes == [1.0, None]

    eng2, act2, sink2 = make(src, backend, log_actions=False)
    start(eng2, act2, F1)
    eng2.submit(Event("flow.metrics", 0.5, {"loss": 0.5}, F1), 0.5)
    assert act2.switches() == [(F1, "dccp")]
    assert [d.stack for _, d, _ in sink2.decisions] == ["udp"]  # only decide()'s


@pytest.mark.parametrize("backend", BACKENDS)
def test_flows_the_actuator_no_longer_lists_are_forgotten(backend: str) -> None:
    eng, act, _ = make("""
        rule start: on flow.new then use_stack(udp)
        rule flip: on timer.t if stack == "udp" then use_stack(dccp)
    """, backend)
    start(eng, act, F1)
    start(eng, act, F2)
    del act.table[F2]  # the datapath expired F2
    eng.submit(Event("timer.t", 1.0, {"name": "t"}), 1.0)
    assert act.switches() == [(F1, "dccp")]
    assert eng.flow_state(F2) is None
    assert eng.stats["flows_pruned"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_examples_rules_decide_as_commented(backend: str) -> None:
    eng = RulesFile(str(RULES_DIR / "examples.rules")).engine(None, None, backend=backend)
    dns = eng.decide(new_event(FlowKey(17, "10.0.0.1", 4000, "9.9.9.9", 53)), 0.0)
    assert (dns.stack, dns.dscp, dns.rule) == ("udp", 46, "dns_raw")
    media = eng.decide(new_event(FlowKey(17, "10.0.0.1", 4001, "10.3.0.1", 5004)), 0.0)
    assert (media.stack, media.options, media.rule) == ("dccp", {"ccid": 2}, "media_in_core")
    media6 = eng.decide(new_event(FlowKey(17, "fd00::1", 4001, "fd00::9", 9000)), 0.0)
    assert media6.stack == "dccp"
    outside = eng.decide(new_event(FlowKey(17, "10.0.0.1", 4002, "192.0.2.9", 5006)), 0.0)
    assert (outside.stack, outside.rule) == ("udp", "media_elsewhere")
    bulk = eng.decide(new_event(FlowKey(6, "10.0.0.1", 4003, "192.0.2.80", 443)), 0.0)
    assert bulk.stack == "tcp"
    big = eng.decide(new_event(FlowKey(6, "10.0.0.1", 4004, "203.0.113.1", 443),
                               payload_len=1400), 0.0)
    assert big.stack == "tcp"
    small = eng.decide(new_event(FlowKey(6, "10.0.0.1", 4005, "203.0.113.1", 443),
                                 payload_len=100), 0.0)
    assert small.stack is None  # no rule: the datapath's default
    telnet = eng.decide(new_event(FlowKey(6, "10.0.0.1", 4006, "203.0.113.1", 23)), 0.0)
    assert telnet.drop and telnet.rule == "no_telnet"
    mirror = eng.decide(new_event(FlowKey(17, "10.0.0.1", 4007, "198.51.100.7", 1)), 0.0)
    assert mirror.target == ("198.51.100.8", 9000)
    ping = eng.decide(new_event(FlowKey(1, "10.0.0.1", 7, "10.0.0.2", 0)), 0.0)
    assert ping.stack is None and eng.timers() == {"heartbeat": (60.0, None)}
    eng.handle_timer(60.0)
    assert eng.timers() == {}
    eng.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_durations_follow_param_overrides(backend: str) -> None:
    src = """
        param hold = 2s
        rule start: on flow.new then use_stack(udp)
        rule lossy: on flow.metrics if loss > 0.1 for hold then use_stack(dccp)
    """
    for params, switched_at in (({}, 2.0), ({"hold": 4.0}, 4.0)):
        eng, act, _ = make(src, backend, params=params)
        start(eng, act, F1)
        times: list[float] = []
        for i in range(11):
            t = i * 0.5
            eng.submit(Event("flow.metrics", t, {"loss": 0.5}, F1), t)
            if act.switches() and not times:
                times.append(t)
        assert times == [switched_at]


@pytest.mark.parametrize("backend", BACKENDS)
def test_failing_flow_listing_is_counted_and_forgets_nothing(backend: str) -> None:
    eng, act, _ = make("""
        rule start: on flow.new then use_stack(udp)
        rule flip: on timer.t if stack == "udp" then use_stack(dccp)
    """, backend)
    start(eng, act, F1)
    act.fail.add("flows")
    eng.submit(Event("timer.t", 1.0, {"name": "t"}), 1.0)  # uses the engine's own table
    assert eng.stats["action_errors"] == 1
    assert eng.flow_state(F1) is not None
    assert act.switches() == [(F1, "dccp")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_switches_made_outside_the_engine_are_seen(backend: str) -> None:
    """``vstack switch`` (the control socket) and management handled without rules call
    the actuator directly: the engine must not act on its stale idea of the flow."""
    act, sink = LookupActuator(), RecordingSink()
    eng = DecisionEngine(parse_rules("""
        rule start: on flow.new then use_stack(udp), use_interface(veth0)
        rule back: on flow.metrics if loss < 0.01 then use_stack(udp)
        rule home: on mgmt.home then use_interface(veth0)
        rule mark: on mgmt.probe if stack == "dccp" then set_dscp(46)
    """, "t.rules"), act, sink, backend=backend)
    start(eng, act, F1)
    assert act.table[F1] == {"stack": "udp", "iface": "veth0"}
    act.switch(F1, "dccp", rule="cli")  # vstack switch F1 dccp
    act.use_interface(F1, "veth1", rule="cli")
    act.calls.clear()
    eng.submit(Event("mgmt.probe", 1.0, {"flow": str(F1)}), 1.0)
    assert act.calls == [("set_dscp", F1, 46)]  # the condition saw stack dccp
    eng.submit(Event("flow.metrics", 2.0, {"loss": 0.0}, F1), 2.0)
    assert act.switches() == [(F1, "udp")]  # not skipped as "already on udp"
    assert act.table[F1]["stack"] == "udp"
    eng.submit(Event("mgmt.home", 3.0, {"flow": str(F1)}), 3.0)
    assert ("use_interface", F1, "veth0", "home") in act.calls
    assert act.table[F1]["iface"] == "veth0"
    st = eng.flow_state(F1)
    assert st is not None and (st["stack"], st["iface"]) == ("udp", "veth0")
    eng.submit(Event("flow.metrics", 4.0, {"loss": 0.0}, F1), 4.0)
    assert act.switches() == [(F1, "udp")]  # now a real no-op: no second call
    assert act.looked_up == 4 and act.listed == 0  # O(1) per event, no listing of all flows


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_actuator_without_flow_info_is_not_listed_per_flow_event(backend: str) -> None:
    """Replay's actuator has no ``flow_info``: listing every flow on every event about one
    flow made learning ~10x slower. The engine goes by what it last decided."""
    eng, act, _ = make("""
        rule start: on flow.new then use_stack(udp)
        rule up: on flow.metrics if loss > 0.1 then use_stack(dccp)
        rule pin: on mgmt.pin then use_interface(veth1)
    """, backend)
    for k in (F1, F2, F3):
        start(eng, act, k)
    for t in range(3):
        for k in (F1, F2, F3):
            eng.submit(Event("flow.metrics", float(t), {"loss": 0.5}, k), float(t))
    eng.submit(Event("mgmt.pin", 4.0, {"flow": str(F2)}), 4.0)
    assert act.listed == 0
    assert act.switches() == [(F1, "dccp"), (F2, "dccp"), (F3, "dccp")]  # once each
    assert ("use_interface", F2, "veth1", "pin") in act.calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failing_lookup_falls_back_to_what_the_engine_knows(backend: str) -> None:
    act = LookupActuator()
    eng = DecisionEngine(parse_rules("""
        rule start: on flow.new then use_stack(udp)
        rule up: on flow.metrics if loss > 0.1 then use_stack(dccp)
    """, "t.rules"), act, None, backend=backend)
    start(eng, act, F1)
    act.fail.add("flows")
    eng.submit(Event("flow.metrics", 1.0, {"loss": 0.5}, F1), 1.0)
    assert act.switches() == [(F1, "dccp")]
    assert eng.stats["errors"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_noop_action_does_not_use_up_at_most_once_per(backend: str) -> None:
    eng, act, _ = make("""
        rule start: on flow.new then use_stack(udp)
        rule up: on flow.metrics if loss > 0.1 then use_stack(dccp)
        rule down: on flow.metrics if loss <= 0.1 then use_stack(udp) at most once per 5s
    """, backend)
    start(eng, act, F1)
    for t, loss in ((1.0, 0.0), (2.0, 0.5), (3.0, 0.0), (4.0, 0.5), (5.0, 0.0)):
        eng.submit(Event("flow.metrics", t, {"loss": loss}, F1), t)
    # t=1: down is a no-op (already udp) and must not start its 5 s; t=3: down switches
    # back (its 5 s start now); t=4 up; t=5 down is suppressed (3 + 5 > 5)
    assert act.switches() == [(F1, "dccp"), (F1, "udp"), (F1, "dccp")]
    assert eng.flow_state(F1)["stack"] == "dccp"  # type: ignore[index]
