"""The decision engine: a ``StackSelector`` whose decisions come from a ``.rules`` file.

How the daemon uses it (all calls on the datapath's asyncio loop thread; the engine starts
no threads and reads no clock - ``now`` is always the caller's)::

    rules = RulesFile("rules/default.rules")
    engine = rules.engine(actuator, sink, backend="durable", exploration=0.0, seed=0)
    decision = engine.decide(flow_new_event, now)   # first packet of a flow, synchronous
    engine.submit(event, now)                        # flow.metrics, link.down, mgmt.*, ...
    loop.call_at(engine.next_timer(), ...) -> engine.handle_timer(now)   # timer.<name>
    rules.reload(engine)                              # SIGHUP / file change; keeps old on error
    engine.forget(flow)                               # when the flow manager expires a flow

Semantics beyond the evaluator's (``vstack.decision.evaluator``):

* ``for D``: a rule fires only once its condition has held for D, continuously, for that
  flow: the first matching event starts the clock, any event of the rule's type for that
  flow on which the condition is false resets it.
* ``at most once per D``: after a rule takes effect for a flow it does not fire again for
  that flow until D has passed. A rule takes effect when one of its actions changed
  something (a ``use_stack`` of the stack the flow is already on did not) or a ``log`` /
  timer action of it ran; on ``flow.new``, when its actions are in the decision.
* The flow's current stack, interface and target are read from the actuator's
  ``flow_info(key)`` (O(1); the Datapath has it) before an event about a flow is
  evaluated: ``vstack switch``, management handled without rules and the datapath change
  them without telling the engine. An actuator without ``flow_info`` (replay's: only the
  engine changes its flows) is not asked - listing all its flows per event made replay
  and learning ~10x slower - so the engine goes by what it last decided or listed.
* Events about a flow (``event.flow``, or a ``flow`` field holding a flow key, as in
  ``mgmt.switch``) are evaluated once with the flow's facts (its classifier fields, its
  current stack/interface, its last metrics) under the event's fields. Events without a
  flow are evaluated per flow for the rules that look at or act on flows, over the
  *affected flows*: for ``link.down`` and ``addr.del``, the flows pinned to that
  interface (``iface == ifname``; flows left to routing follow the kernel's routes); for
  every other event (``link.up``, ``addr.add``, ``route.change``, ``mgmt.*``,
  ``timer.*``), every live flow. Rules that neither read flow facts nor act on flows
  (``log``, timers) run once per event.
* Timers are global by name. ``start_timer(flip, 5s, repeat=true)`` arms ``flip`` unless it
  is already armed (``restart=true`` re-arms it); ``handle_timer(now)`` raises
  ``timer.flip`` events for the timers due.
* An exception inside an action (the actuator's, or a bad dynamic argument) is logged and
  counted in ``stats["action_errors"]``; it never propagates. Errors inside matching are
  counted in ``stats["errors"]``; ``decide`` then returns a default ``Decision``.
* Exploration (``exploration=epsilon``): on ``flow.new``, with probability epsilon the
  stack is drawn uniformly among the stacks the matching rules name (if fewer than two,
  among all stacks the rule set names); ``Decision.propensity`` is the probability of the
  stack actually chosen, ``Decision.explored`` whether it differs from the rules' choice.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vstack.analysis.flowkey import FlowKey
from vstack.decision import ast as A
from vstack.decision.checker import Diagnostic, RulesCheckError, check_or_raise
from vstack.decision.evaluator import (
    BoundAction,
    Fired,
    ReferenceBackend,
    RuleIndex,
    bind,
    effective,
)
from vstack.decision.events import METRIC_FIELDS, Event
from vstack.decision.parser import RulesSyntaxError, parse_rules_file
from vstack.decision.semantics import is_flow_rule
from vstack.execution.selector import Actuator, Decision
from vstack.log import DecisionSink, NullSink

log = logging.getLogger("vstack.decision")

Backend = Any  # ReferenceBackend | DurableBackend (both: match(), close())
_SCOPED_BY_IFACE = frozenset({"link.down", "addr.del"})


def make_backend(index: RuleIndex, backend: str) -> Backend:
    if backend == "reference":
        return ReferenceBackend(index)
    if backend == "durable":
        from vstack.decision.durable import DurableBackend
        return DurableBackend(index)
    raise ValueError(f"unknown decision backend {backend!r} (durable, reference)")


def flow_facts(key: FlowKey) -> dict[str, Any]:
    """The facts a flow key alone provides."""
    return {"flow": str(key), "proto": key.proto_name, "family": key.family, "src": key.src,
            "sport": key.sport, "dst": key.dst, "dport": key.dport}


@dataclass(slots=True)
class _Flow:
    facts: dict[str, Any]
    stack: str = ""
    iface: str = ""
    target: str = ""
    rule: str = ""

    def view(self) -> dict[str, Any]:
        return {**self.facts, "stack": self.stack, "iface": self.iface}


@dataclass(slots=True)
class _Timer:
    deadline: float
    period: float | None  # None: one-shot


@dataclass(slots=True)
class _Compiled:
    ruleset: A.RuleSet
    index: RuleIndex
    backend: Backend
    version: str
    flow_rules: frozenset[str]  # rules run per flow for flowless events
    global_rules: frozenset[str]  # the others: run once per event
    stacks: tuple[str, ...]  # stacks named literally by use_stack anywhere
    warnings: list[Diagnostic] = field(default_factory=list)


class DecisionEngine:
    """Implements ``StackSelector``; acts on flows through an ``Actuator``."""

    def __init__(self, ruleset: A.RuleSet, actuator: Actuator | None = None,
                 sink: DecisionSink | None = None, *, backend: str = "durable",
                 exploration: float = 0.0, seed: int = 0,
                 params: Mapping[str, Any] | None = None, log_actions: bool = True) -> None:
        if not 0.0 <= exploration <= 1.0:
            raise ValueError("exploration must be within 0..1")
        self.actuator = actuator
        self.sink: DecisionSink = sink if sink is not None else NullSink()
        self.backend_name = backend
        self.exploration = exploration
        self._rng = random.Random(seed)
        self.stats: Counter[str] = Counter()
        self._flows: dict[FlowKey, _Flow] = {}
        # Anti-flapping state per flow (None: flowless evaluations): rule name -> when its
        # condition started to hold (``for``) / when it last took effect (``at most once``).
        self._hold: dict[FlowKey | None, dict[str, float]] = {}
        self._last: dict[FlowKey | None, dict[str, float]] = {}
        self._timers: dict[str, _Timer] = {}
        # Called (on the caller's thread) whenever the set of armed timers changes, so an
        # adapter can re-arm its loop timer (``vstack.decision.driver``).
        self.on_timers_changed: Callable[[], None] | None = None
        # Log a Decision (with facts and rules version) for every flow an event changed.
        # An actuator that logs its own actions may turn this off to avoid two records.
        self.log_actions = log_actions
        self._c = self._compile(ruleset, params)
        self._params = dict(params or {})

    # -- rules --------------------------------------------------------------------------
    def _compile(self, ruleset: A.RuleSet, params: Mapping[str, Any] | None) -> _Compiled:
        warnings = check_or_raise(ruleset)
        index = RuleIndex(ruleset, params)
        be = make_backend(index, self.backend_name)
        stacks = sorted({str(a.args[0].id if isinstance(a.args[0], A.Name) else a.args[0].value)
                         for r in ruleset.rules for a in r.actions
                         if a.name == "use_stack" and a.args
                         and not (isinstance(a.args[0], A.Name)
                                  and a.args[0].id in index.params)}
                        )
        flow_rules = frozenset(r.name for r in ruleset.rules if is_flow_rule(r))
        return _Compiled(ruleset, index, be, (ruleset.source_hash or "0" * 12)[:12],
                         flow_rules, frozenset(r.name for r in ruleset.rules) - flow_rules,
                         tuple(stacks), warnings)

    @property
    def ruleset(self) -> A.RuleSet:
        return self._c.ruleset

    @property
    def rules_version(self) -> str:
        return self._c.version

    @property
    def warnings(self) -> list[Diagnostic]:
        return list(self._c.warnings)

    def reload(self, ruleset: A.RuleSet, params: Mapping[str, Any] | None = None) -> str:
        """Swap in a new rule set atomically; returns its version. Raises
        ``RulesCheckError`` (the old rules stay) if it does not check."""
        new = self._compile(ruleset, params if params is not None else self._params)
        old, self._c = self._c, new
        old.backend.close()
        names = {r.name for r in ruleset.rules}
        for table in (self._hold, self._last):
            for per_flow in table.values():
                for gone in [n for n in per_flow if n not in names]:
                    del per_flow[gone]
        self.stats["reloads"] += 1
        log.info("rules %s loaded (version %s, %d rules)", ruleset.filename, new.version,
                 len(ruleset.rules))
        return new.version

    def close(self) -> None:
        self._c.backend.close()

    # -- flows ---------------------------------------------------------------------------
    def forget(self, flow: FlowKey) -> None:
        """The flow ended: drop its state."""
        self._flows.pop(flow, None)
        self._hold.pop(flow, None)
        self._last.pop(flow, None)

    def flow_state(self, flow: FlowKey) -> dict[str, Any] | None:
        f = self._flows.get(flow)
        return f.view() if f else None

    def _live_flows(self) -> dict[FlowKey, _Flow]:
        if self.actuator is not None:
            try:
                infos = list(self.actuator.flows())
            except Exception:
                log.exception("actuator.flows() failed")
                self.stats["action_errors"] += 1
                return dict(self._flows)
            live: dict[FlowKey, _Flow] = {}
            for info in infos:
                f = self._flows.get(info.key)
                if f is None:
                    f = self._flows[info.key] = _Flow(flow_facts(info.key))
                f.stack, f.iface, f.target = info.stack, info.interface or "", info.target
                live[info.key] = f
            # The actuator's table is the truth: a flow it no longer lists has ended (the
            # datapath adds a flow right after decide(), on the same loop thread).
            for gone in [k for k in self._flows if k not in live]:
                self.forget(gone)
                self.stats["flows_pruned"] += 1
            return live
        return dict(self._flows)

    # -- StackSelector -------------------------------------------------------------------
    def decide(self, event: Event, now: float) -> Decision:
        """Decide for a new flow (``flow.new`` with the classifier's fields). Never raises."""
        self.stats["events"] += 1
        self.stats["decisions"] += 1
        c = self._c
        key = event.flow
        facts: dict[str, Any] = dict(event.fields)
        if key is not None and "flow" not in facts:
            facts = {**flow_facts(key), **facts}
        if "stack" not in facts:
            facts["stack"] = ""
        if "iface" not in facts:
            facts["iface"] = ""
        self._sink_event(event)
        try:
            eff, fired = self._evaluate(c, event.type, facts, key, now)
            decision = self._decision(c, eff, fired, facts)
            self._run_side_actions(eff, now)
            self._took(key, fired, {a.rule for a in eff}, now)
        except Exception:
            log.exception("decision for %s failed", key)
            self.stats["errors"] += 1
            decision = Decision(rules_version=c.version, facts=dict(facts))
        if key is not None:
            f = self._flows.get(key)
            if f is None:
                f = self._flows[key] = _Flow(dict(facts))
            f.stack = decision.stack or f.stack
            f.iface = decision.interface or str(facts.get("iface") or "")
            f.rule = decision.rule or ""
        try:
            self.sink.decision(key, decision, now)
        except Exception:
            log.exception("decision sink failed")
            self.stats["sink_errors"] += 1
        return decision

    def _decision(self, c: _Compiled, eff: list[BoundAction], fired: list[Fired],
                  facts: Mapping[str, Any]) -> Decision:
        slots = {a.name: a for a in eff}
        us = slots.get("use_stack")
        stack = str(us.args[0]) if us else None
        rule = us.rule if us else next((a.rule for a in eff), None)
        propensity, explored = 1.0, False
        if self.exploration > 0 and stack is not None:
            cands = sorted({str(a.args[0]) for f in fired for a in f.actions
                            if a.name == "use_stack"})
            if len(cands) < 2:
                cands = sorted(set(c.stacks) | {stack})
            if len(cands) >= 2:
                k = len(cands)
                pick = self._rng.choice(cands) if self._rng.random() < self.exploration \
                    else stack
                explored = pick != stack
                propensity = (self.exploration / k) + (0.0 if explored
                                                       else 1.0 - self.exploration)
                if explored:
                    self.stats["explored"] += 1
                    stack = pick
        tgt = slots.get("retarget")
        dscp = slots.get("set_dscp")
        iface = slots.get("use_interface")
        return Decision(
            stack=stack,
            interface=str(iface.args[0]) if iface else None,
            target=tgt.args[0] if tgt else None,
            dscp=int(dscp.args[0]) if dscp else None,
            drop="drop" in slots,
            options=us.option_dict() if us else {},
            rule=rule,
            rules_version=c.version,
            facts=dict(facts),
            propensity=propensity,
            explored=explored,
        )

    # -- other events --------------------------------------------------------------------
    def submit(self, event: Event, now: float) -> int:
        """Handle any other event; apply the actions. Returns how many actions were
        applied. Never raises."""
        self.stats["events"] += 1
        self._sink_event(event)
        c = self._c
        applied = 0
        try:
            key = event.flow
            if key is None and isinstance(event.fields.get("flow"), str) \
                    and event.type.startswith("mgmt."):
                try:
                    key = FlowKey.parse(event.fields["flow"])
                except ValueError:
                    self.stats["bad_events"] += 1
                    log.warning("%s: bad flow key %r", event.type, event.fields["flow"])
            if key is not None:
                f = self._flows.get(key)
                if f is None:
                    f = self._flows[key] = _Flow(flow_facts(key))
                self._refresh(key, f)
                if event.type == "flow.metrics":
                    f.facts.update({k: v for k, v in event.fields.items() if k in METRIC_FIELDS})
                facts = {**f.view(), **event.fields}
                applied += self._run(c, event, facts, key, now, None)
            else:
                has_flow_rules = any(r.name in c.flow_rules for r in c.index.rules_for(event.type))
                has_global = any(r.name not in c.flow_rules
                                 for r in c.index.rules_for(event.type))
                if has_global:
                    applied += self._run(c, event, dict(event.fields), None, now, False)
                if has_flow_rules:
                    for fk, f in self._affected(event).items():
                        facts = {**f.view(), **event.fields}
                        try:
                            applied += self._run(c, event, facts, fk, now, True)
                        except Exception:  # one flow's failure does not stop the others
                            log.exception("event %s failed for %s", event.type, fk)
                            self.stats["errors"] += 1
        except Exception:
            log.exception("event %s failed", event.type)
            self.stats["errors"] += 1
        return applied

    def _refresh(self, key: FlowKey, f: _Flow) -> None:
        """Take the flow's current stack, interface and target from the actuator's
        ``flow_info`` (O(1)), where it has one. A flow it does not know (ended, or not
        added yet) keeps what the engine last knew; so does a failing lookup (counted in
        ``errors``)."""
        lookup = getattr(self.actuator, "flow_info", None)
        if lookup is None:
            return
        try:
            info = lookup(key)
        except Exception:
            log.exception("reading flow %s from the actuator failed", key)
            self.stats["errors"] += 1
            return
        if info is not None:
            f.stack, f.iface, f.target = info.stack, info.interface or "", info.target

    def _affected(self, event: Event) -> dict[FlowKey, _Flow]:
        live = self._live_flows()
        if event.type in _SCOPED_BY_IFACE:
            ifname = event.fields.get("ifname")
            return {k: f for k, f in live.items() if f.iface == ifname}
        return live

    def _run(self, c: _Compiled, event: Event, facts: dict[str, Any], key: FlowKey | None,
             now: float, flow_rules: bool | None) -> int:
        only = None
        if flow_rules is True:
            only = c.flow_rules
        elif flow_rules is False:
            only = c.global_rules
        eff, fired = self._evaluate(c, event.type, facts, key, now, only)
        if not eff:
            return 0
        took: set[str] = set()
        applied = self._apply(c, eff, key, facts, now, took)
        applied += self._run_side_actions(eff, now, took)
        self._took(key, fired, took, now)
        return applied

    def _evaluate(self, c: _Compiled, event_type: str, facts: dict[str, Any],
                  key: FlowKey | None, now: float,
                  only: frozenset[str] | None = None) -> tuple[list[BoundAction], list[Fired]]:
        rules = c.index.rules_for(event_type)
        if not rules:
            return [], []
        prepared = c.index.prepare(event_type, facts)
        matched = c.backend.match(event_type, prepared)
        if only is not None:
            matched = [r for r in matched if r.name in only]
        names = {r.name for r in matched}
        hold = self._hold.get(key)
        if hold:
            for r in rules:
                if r.hold is not None and r.name not in names \
                        and (only is None or r.name in only):
                    hold.pop(r.name, None)
        fired: list[Fired] = []
        for r in matched:
            if r.hold is not None:
                if hold is None:
                    hold = self._hold[key] = {}
                t0 = hold.setdefault(r.name, now)
                if now - t0 < c.index.hold_of(r):
                    continue
            if r.once_per is not None:
                last = self._last.get(key, {}).get(r.name)
                if last is not None and now - last < c.index.once_of(r):
                    continue
            try:
                fired.append(Fired(r, bind(r, prepared, c.index.params)))
            except (ValueError, TypeError) as e:
                log.warning("rule %s: bad action argument: %s", r.name, e)
                self.stats["action_errors"] += 1
        eff = effective(fired)
        won = {a.rule for a in eff}
        for f in fired:
            if f.rule.name in won:
                self.stats[f"fired:{f.rule.name}"] += 1
        return eff, fired

    def _took(self, key: FlowKey | None, fired: list[Fired], took: set[str], now: float) -> None:
        """Start ``at most once per`` for the rules that took effect (``took``): a rule
        whose actions were all no-ops (or all failed) does not use up its interval."""
        for f in fired:
            if f.rule.once_per is not None and f.rule.name in took:
                self._last.setdefault(key, {})[f.rule.name] = now

    def _apply(self, c: _Compiled, eff: list[BoundAction], key: FlowKey | None,
               facts: Mapping[str, Any], now: float, took: set[str] | None = None) -> int:
        """Apply the flow actions; the rules of those that changed something go to
        ``took``. Returns how many did."""
        if key is None:
            return 0
        f = self._flows.get(key)
        if f is None:
            f = self._flows[key] = _Flow(flow_facts(key))
        act = self.actuator
        n = 0
        changed: dict[str, Any] = {}
        for a in eff:
            try:
                if a.name == "use_stack":
                    stack = str(a.args[0])
                    if stack == f.stack:
                        continue
                    if act is not None:
                        act.switch(key, stack, a.option_dict(), rule=a.rule)
                    f.stack = stack
                    changed.update(stack=stack, options=a.option_dict())
                elif a.name == "use_interface":
                    ifname = str(a.args[0])
                    if ifname == f.iface:
                        continue
                    if act is not None:
                        act.use_interface(key, ifname, rule=a.rule)
                    f.iface = ifname
                    changed["interface"] = ifname
                elif a.name == "retarget":
                    addr, port = a.args[0]
                    if act is not None:
                        act.retarget(key, addr, port, rule=a.rule)
                    f.target = f"{addr}:{port}" if port is not None else addr
                    changed["target"] = (addr, port)
                elif a.name == "set_dscp":
                    if act is not None:
                        act.set_dscp(key, int(a.args[0]))
                    changed["dscp"] = int(a.args[0])
                elif a.name == "drop":
                    if act is not None:
                        act.drop(key)
                    changed["drop"] = True
                else:
                    continue
                f.rule = a.rule
                n += 1
                self.stats["actions"] += 1
                if took is not None:
                    took.add(a.rule)
            except Exception:
                log.exception("action %s of rule %s failed for %s", a.name, a.rule, key)
                self.stats["action_errors"] += 1
        if changed and self.log_actions:
            rule = next((a.rule for a in eff if a.name == "use_stack"), eff[0].rule)
            d = Decision(rules_version=c.version, facts=dict(facts), rule=rule, **changed)
            try:
                self.sink.decision(key, d, now)
            except Exception:
                log.exception("decision sink failed")
                self.stats["sink_errors"] += 1
        if changed.get("drop"):
            self.forget(key)
        return n

    def _run_side_actions(self, eff: Iterable[BoundAction], now: float,
                          took: set[str] | None = None) -> int:
        n = 0
        timers_changed = False
        for a in eff:
            try:
                if a.name == "log":
                    log.info("rule %s: %s", a.rule, a.args[0])
                    self.stats["logs"] += 1
                elif a.name == "start_timer":
                    opts = a.option_dict()
                    name, period = str(a.args[0]), float(a.args[1])
                    if period <= 0:
                        raise ValueError(f"timer period must be positive, not {period}")
                    if name not in self._timers or opts.get("restart"):
                        self._timers[name] = _Timer(now + period,
                                                    period if opts.get("repeat") else None)
                        timers_changed = True
                elif a.name == "stop_timer":
                    timers_changed |= self._timers.pop(str(a.args[0]), None) is not None
                else:
                    continue
                n += 1
                if took is not None:
                    took.add(a.rule)
            except Exception:
                log.exception("action %s of rule %s failed", a.name, a.rule)
                self.stats["action_errors"] += 1
        if timers_changed:
            self._timers_changed()
        return n

    def _timers_changed(self) -> None:
        hook = self.on_timers_changed
        if hook is not None:
            try:
                hook()
            except Exception:
                log.exception("on_timers_changed hook failed")
                self.stats["errors"] += 1

    def _sink_event(self, event: Event) -> None:
        try:
            self.sink.event(event)
        except Exception:
            log.exception("decision sink failed")
            self.stats["sink_errors"] += 1

    # -- timers (sans-IO) ------------------------------------------------------------------
    def next_timer(self) -> float | None:
        """When ``handle_timer`` should next be called (the caller's clock), or None."""
        return min((t.deadline for t in self._timers.values()), default=None)

    def timers(self) -> dict[str, tuple[float, float | None]]:
        return {n: (t.deadline, t.period) for n, t in self._timers.items()}

    def handle_timer(self, now: float) -> int:
        """Raise ``timer.<name>`` for every timer due at ``now``; returns actions applied."""
        due = sorted((t.deadline, n) for n, t in self._timers.items() if t.deadline <= now)
        applied = 0
        for deadline, name in due:
            t = self._timers.get(name)
            if t is None or t.deadline != deadline:
                continue
            if t.period is not None:
                t.deadline = deadline + t.period
                if t.deadline <= now:  # we were late: skip the missed periods
                    t.deadline = now + t.period
            else:
                del self._timers[name]
            self.stats["timers"] += 1
            applied += self.submit(Event(f"timer.{name}", deadline, {"name": name}), now)
        if due:
            self._timers_changed()
        return applied


class RulesFile:
    """A ``.rules`` file on disk: load, check, (re)load into an engine, watch for change."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.last_error: str | None = None
        self.warnings: list[Diagnostic] = []
        self._stamp: tuple[int, int, int] | None = None

    def _stat(self) -> tuple[int, int, int] | None:
        import os
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load(self) -> A.RuleSet:
        """Parse and check. Raises ``RulesSyntaxError`` or ``RulesCheckError``."""
        stamp = self._stat()
        rs = parse_rules_file(self.path)
        self.warnings = check_or_raise(rs)
        self._stamp = stamp
        return rs

    def engine(self, actuator: Actuator | None = None, sink: DecisionSink | None = None,
               **kwargs: Any) -> DecisionEngine:
        return DecisionEngine(self.load(), actuator, sink, **kwargs)

    def changed(self) -> bool:
        """Has the file changed since the last (attempted) load?"""
        return self._stat() != self._stamp

    def reload(self, engine: DecisionEngine) -> bool:
        """Load into ``engine``. On any error the engine keeps its old rules, the positioned
        error is logged and kept in ``last_error``, and False is returned."""
        try:
            rs = self.load()
            engine.reload(rs)
        except (RulesSyntaxError, RulesCheckError) as e:
            self._stamp = self._stat()  # don't retry the same bad file on every poll
            self.last_error = str(e)
            engine.stats["reload_errors"] += 1
            log.error("rules reload failed, keeping version %s:\n%s", engine.rules_version, e)
            return False
        except Exception as e:  # a backend failure: still keep the old rules
            self._stamp = self._stat()
            self.last_error = f"{self.path}:1:1: {e}"
            engine.stats["reload_errors"] += 1
            log.exception("rules reload failed, keeping version %s", engine.rules_version)
            return False
        self.last_error = None
        return True
