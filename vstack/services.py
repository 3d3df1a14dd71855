"""The daemon's control-plane services on the datapath's asyncio loop.

``vstack run`` starts them once the datapath reads the TUN, and closes them on the way out::

    services = await start_services(cfg, datapath, engine, driver, sink)
    ...
    await services.close()

What connects to what (everything on the one loop; nothing here starts a thread):

* **management port** (``[management] listen``, HMAC-signed JSON over UDP,
  ``vstack.management``): every accepted message becomes a ``mgmt.<type>`` event.
  With a rule engine it goes to ``engine.submit`` (what it does is up to the rules, e.g.
  ``on mgmt.switch then use_stack(stack)``). Without one (the static selector), a built-in
  minimal handler acts on ``mgmt.switch`` (``Actuator.switch``) and ``mgmt.retarget``
  (``Actuator.retarget``) directly, attributed to the rule ``"mgmt"``; other types are
  counted as ``ignored``. Rejected messages never reach either.
* **netlink monitor** (``vstack.monitor``; only with a rule engine, as only rules act on
  them): ``link.up/down``, ``addr.add/del`` and ``route.change`` of the daemon's network
  namespace go to ``engine.submit``; ``[monitor] interfaces`` limits them to those
  interfaces.
* **control socket** (``[control] socket``, ``vstack.control``): ``flows`` and ``switch``
  over the datapath (the Actuator), ``why`` (the decision history below), ``rules_reload``
  (the driver's reload: a bad file answers with its positioned error and the old rules
  stay), ``stats`` (datapath, engine, decision log, management, monitor, control counters).
* **decision history** for ``why``: the engine keeps no history, so the sink the datapath
  and the engine log to is wrapped (``HistorySink``): it remembers the last
  ``HISTORY_PER_FLOW`` decisions of the last ``HISTORY_FLOWS`` flows in memory and passes
  everything on unchanged.

With several workers (``vstack.workers``; ``start_services(..., workers=links)`` in the
parent, worker 0) the control handlers fan out over the links (``fan_*``: flows merged and
tagged ``worker``, ``switch``/``why`` to the owner, ``stats`` per worker and summed,
``rules_reload`` in two phases: every worker checks its file has worker 0's version and
holds it, then all swap it in; see ``fan_rules_reload``), and management / monitor events are
forwarded (``submit_everywhere``): one without a flow to every worker's engine (one way,
no answer awaited), one naming a flow only to the worker that owns it (the workers are
asked; the others answer "not mine" and submit nothing; no owner: counted as
``forwarding.no_owner`` in ``stats``). A worker serves ``local_services(...).handlers()``
plus ``event`` on its end of the link.

Failures: the management port is asked for explicitly, so a bad ``listen`` address or a
port in use stops the daemon (``datapath.on_failure``: exit status 1 with the message). The
control socket and the monitor are helpers: if they cannot start, the error is logged and
the daemon runs without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vstack.analysis.flowkey import FlowKey
from vstack.config import Config, ConfigError, parse_endpoint
from vstack.decision.events import Event
from vstack.execution.selector import Actuator, Decision
from vstack.log import DecisionSink, NullSink

log = logging.getLogger("vstack.services")

HISTORY_PER_FLOW = 32  # decisions kept per flow for ``vstack why``
HISTORY_FLOWS = 4096  # flows kept (least recently decided dropped first)
_MERGE_S = 1.0  # engine record this close to the actuator's own record (either clock): same action


class UnknownFlow(LookupError):
    """``why`` for a flow with no recorded decision."""


class RulesReloadError(RuntimeError):
    """``rules_reload`` failed; the message is the positioned error (``file:line:col``)."""


# ----------------------------------------------------------------------------- history
def decision_record(d: Decision, now: float) -> dict[str, Any]:
    """One ``why`` entry: the fields of ``d`` that say something, and when."""
    rec: dict[str, Any] = {"time": now, "rule": d.rule or "", "stack": d.stack or ""}
    if d.interface is not None:
        rec["interface"] = d.interface
    if d.target is not None:
        addr, port = d.target
        rec["target"] = addr if port is None else (
            f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}")
    if d.dscp is not None:
        rec["dscp"] = d.dscp
    if d.drop:
        rec["drop"] = True
    if d.options:
        rec["options"] = dict(d.options)
    if d.rules_version:
        rec["rules_version"] = d.rules_version
    if d.propensity != 1.0 or d.explored:
        rec["propensity"] = d.propensity
        rec["explored"] = d.explored
    rec["facts"] = dict(d.facts)
    return rec


class HistorySink:
    """A ``DecisionSink`` that remembers recent decisions per flow and passes every call
    on to ``inner``. The same ``Decision`` object twice in a row (the engine and the
    datapath both log a ``flow.new`` decision) is remembered once; an engine record with
    facts right after the actuator's record of the same action (no facts, same rule)
    replaces it. Other attributes (``recorder``, ``stats``, ``dropped``) are the inner
    sink's."""

    def __init__(self, inner: DecisionSink | None = None, *,
                 per_flow: int = HISTORY_PER_FLOW, max_flows: int = HISTORY_FLOWS) -> None:
        self.inner: DecisionSink = inner if inner is not None else NullSink()
        self.per_flow = per_flow
        self.max_flows = max_flows
        self._hist: OrderedDict[FlowKey, deque[dict[str, Any]]] = OrderedDict()
        self._last: Decision | None = None

    def __getattr__(self, name: str) -> Any:  # only reached for names not defined here
        return getattr(self.inner, name)

    # -- DecisionSink
    def event(self, event: Event) -> None:
        self.inner.event(event)

    def decision(self, flow: FlowKey | None, decision: Decision, now: float) -> None:
        try:
            if flow is not None and decision is not self._last:
                self._remember(flow, decision, now)
            self._last = decision
        except Exception:  # the history must never stop the decision log
            log.exception("decision history")
        self.inner.decision(flow, decision, now)

    def outcome(self, flow: FlowKey, stack: str, now: float, metrics: Mapping[str, Any]) -> None:
        self.inner.outcome(flow, stack, now, metrics)

    def flow_seen(self, flow: FlowKey, features: Mapping[str, Any], now: float) -> None:
        self.inner.flow_seen(flow, features, now)

    def close(self) -> None:
        self.inner.close()

    # -- history
    def _remember(self, flow: FlowKey, d: Decision, now: float) -> None:
        h = self._hist.get(flow)
        if h is None:
            h = self._hist[flow] = deque(maxlen=self.per_flow)
            while len(self._hist) > self.max_flows:
                self._hist.popitem(last=False)
        else:
            self._hist.move_to_end(flow)
        rec = decision_record(d, now)
        if h and rec["facts"]:
            prev = h[-1]
            if (not prev["facts"] and prev["rule"] == rec["rule"]
                    and abs(now - prev["time"]) < _MERGE_S):
                h[-1] = {**prev, **rec}
                return
        h.append(rec)

    def history(self, flow: FlowKey) -> list[dict[str, Any]] | None:
        """The remembered decisions of ``flow``, oldest first; None if none."""
        h = self._hist.get(flow)
        return list(h) if h is not None else None

    def forget(self, flow: FlowKey) -> None:
        self._hist.pop(flow, None)


# ------------------------------------------------------------------- mgmt without rules
class MinimalMgmtHandler:
    """What management commands do when no rule engine runs: ``mgmt.switch`` switches the
    flow's stack, ``mgmt.retarget`` its NAT target (``ADDR[:PORT]``), through the
    Actuator, as rule ``"mgmt"``. Anything else is counted as ``ignored``. Errors (no such
    flow, unknown stack, bad target) are logged and counted, never raised."""

    def __init__(self, actuator: Actuator) -> None:
        self.actuator = actuator
        self.counters: Counter[str] = Counter()

    def __call__(self, event: Event) -> None:
        flow = event.flow
        try:
            if event.type == "mgmt.switch" and flow is not None:
                self.actuator.switch(flow, str(event.fields["stack"]), rule="mgmt")
                log.info("management: %s switched to %s", flow, event.fields["stack"])
            elif event.type == "mgmt.retarget" and flow is not None:
                t = parse_endpoint(str(event.fields["target"]), "mgmt.retarget target")
                self.actuator.retarget(flow, t.address, t.port, rule="mgmt")
                log.info("management: %s retargeted to %s", flow, t)
            else:
                self.counters["ignored"] += 1
                log.info("management: %s ignored (no rule engine)", event.type)
                return
        except (LookupError, ValueError, ConfigError, RuntimeError) as e:
            self.counters["errors"] += 1
            log.warning("management %s failed: %s", event.type, e)
            return
        self.counters["applied"] += 1


# ------------------------------------------------------------------------ the services
@dataclass(slots=True)
class Services:
    """The started services; ``await close()`` stops them (idempotent)."""

    cfg: Config
    datapath: Any  # vstack.datapath.Datapath (the Actuator)
    engine: Any = None  # vstack.decision.engine.DecisionEngine | None
    driver: Any = None  # vstack.decision.driver.EngineDriver | None
    sink: Any = None  # the daemon's sink (LogWriter / RecordingSink / None)
    history: HistorySink | None = None
    mgmt: Any = None  # vstack.management.ManagementServer | None
    mgmt_handler: MinimalMgmtHandler | None = None
    monitor: Any = None  # vstack.monitor.NetlinkMonitor | None
    control: Any = None  # vstack.control.ControlServer | None
    workers: list[Any] = field(default_factory=list)  # vstack.workers.WorkerLink, 1..N-1
    forwarding: Counter[str] = field(default_factory=Counter)  # events to workers
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)  # owner look-ups
    _prepared: Any = None  # rules held by rules_prepare until rules_commit / rules_abort
    started: float = field(default_factory=time.time)
    _closed: bool = False

    # -- handlers for the control socket
    def handlers(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        """This process's handlers; with ``workers``, the fan-out over all of them."""
        h = self.local_handlers()
        if self.workers:
            h.update(flows=self.fan_flows, switch=self.fan_switch, why=self.fan_why,
                     stats=self.fan_stats, rules_reload=self.fan_rules_reload)
        return h

    def link_handlers(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        """What a worker serves on its link: its handlers, ``event`` and the two phases
        of a rules reload (not on any control socket)."""
        h = self.handlers()
        h.update(event=self.event, rules_prepare=self.rules_prepare,
                 rules_commit=self.rules_commit, rules_abort=self.rules_abort)
        return h

    def local_handlers(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        from vstack.control import actuator_handlers

        h = actuator_handlers(self.datapath, log_dropped=self._log_dropped)
        h.update(why=self.why, rules_reload=self.rules_reload, stats=self.stats)
        return h

    # -- events forwarded by the parent (a worker's ``event`` link method)
    def event(self, params: dict[str, Any]) -> dict[str, Any]:
        """A management or monitor event the parent accepted: to this worker's engine, or
        with no engine to the minimal handler. With ``owner_only`` (an event naming a
        flow) only if the flow is here: else ``{"owner": False}`` and nothing is submitted
        (an engine would make a phantom flow of it and its action fail)."""
        from vstack.workers import event_from_json

        ev = event_from_json(params)
        if params.get("owner_only") and ev.flow is not None and not _owns(self.datapath,
                                                                          ev.flow):
            return {"owner": False}
        if self.engine is not None:
            self.engine.submit(ev, ev.time)
            return {"owner": True, "submitted": True}
        handler = self.mgmt_handler or MinimalMgmtHandler(self.datapath)
        self.mgmt_handler = handler
        before = handler.counters["applied"]
        handler(ev)
        return {"owner": True, "applied": handler.counters["applied"] > before}

    def submit_everywhere(self, local: Callable[[Event], None]) -> Callable[[Event], None]:
        """``local`` for this process, and the event forwarded: one without a flow (link,
        address, route, congestion) to every worker's engine, one way; one naming a flow
        only to the worker that owns it (``_to_owner``)."""
        if not self.workers:
            return local

        def submit(ev: Event) -> None:
            if ev.flow is not None:
                self._to_owner(local, ev)
                return
            local(ev)
            params = _event_params(ev)
            for w in self.workers:
                w.notify("event", params)
            self.forwarding["broadcast"] += 1

        return submit

    def _to_owner(self, local: Callable[[Event], None], ev: Event) -> None:
        assert ev.flow is not None
        if _owns(self.datapath, ev.flow):
            local(ev)
            self.forwarding["to_owner"] += 1
            return
        task = asyncio.get_running_loop().create_task(self._owner_event(ev))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _owner_event(self, ev: Event) -> None:
        """Ask every worker with ``owner_only``: the owner submits it, the others answer
        "not mine". No owner: counted (``no_owner``) and logged, submitted nowhere."""
        params = {**_event_params(ev), "owner_only": True}
        answers = await self._ask_all("event", params)
        owned = [a for a in answers.values() if isinstance(a, dict) and a.get("owner")]
        handler = self.mgmt_handler
        if owned:
            self.forwarding["to_owner"] += 1
            if handler is not None:
                handler.counters["applied" if owned[0].get("applied") else "errors"] += 1
            return
        self.forwarding["no_owner"] += 1
        if handler is not None:
            handler.counters["errors"] += 1
        failed = [f"worker {w}: {a}" for w, a in answers.items() if isinstance(a, Exception)]
        log.warning("%s not submitted: no flow %s on any worker%s", ev.type, ev.flow,
                    f" ({'; '.join(failed)})" if failed else "")

    # -- fan-out over the workers (the parent, worker 0, with ``workers``)
    async def _ask_all(self, method: str, params: dict[str, Any]) -> dict[int, Any]:
        """Each worker's answer, or the exception it raised (``WorkerError`` /
        ``WorkerUnavailable``), by worker id; the requests run concurrently."""
        res = await asyncio.gather(*(w.request(method, params) for w in self.workers),
                                   return_exceptions=True)
        out: dict[int, Any] = {}
        for w, r in zip(self.workers, res, strict=True):
            if isinstance(r, BaseException) and not isinstance(r, Exception):
                raise r
            out[w.wid] = r
        return out

    async def fan_flows(self, params: dict[str, Any]) -> dict[str, Any]:
        from vstack.control import actuator_handlers, flows_limit

        limit = flows_limit(params)  # a bad limit is refused before any worker is asked
        local = actuator_handlers(self.datapath, self._log_dropped)["flows"](params)
        return merge_flows({0: local, **await self._ask_all("flows", params)}, limit)

    async def fan_switch(self, params: dict[str, Any]) -> dict[str, Any]:
        from vstack.control import actuator_handlers

        try:
            return {**actuator_handlers(self.datapath)["switch"](params), "worker": 0}
        except LookupError as e:
            local_err: Exception = e
        return pick_owner("switch", params, local_err, await self._ask_all("switch", params))

    async def fan_why(self, params: dict[str, Any]) -> dict[str, Any]:
        try:
            out = self.why(params)
        except UnknownFlow as e:
            return pick_owner("why", params, e, await self._ask_all("why", params))
        if not out["live"]:  # the flow may live on a worker now (this is old history)
            answers = await self._ask_all("why", params)
            for wid, a in sorted(answers.items()):
                if isinstance(a, dict) and a.get("live"):
                    return {**a, "worker": wid}
        return {**out, "worker": 0}

    async def fan_stats(self, params: dict[str, Any]) -> dict[str, Any]:
        out = self.stats(params)
        per: dict[int, Any] = {0: {k: out[k] for k in ("datapath", "engine", "log") if k in out}}
        per.update(await self._ask_all("stats", params))
        merged = merge_stats(out, per)
        merged["forwarding"] = dict(self.forwarding)
        merged["links"] = {str(w.wid): {"unresponsive": w.unresponsive, "dead": w.dead,
                                        **dict(w.counters)} for w in self.workers}
        return merged

    async def fan_rules_reload(self, params: dict[str, Any]) -> dict[str, Any]:
        """Reload in two phases so a file edited in between, or any worker that cannot
        load it, leaves the old rules running everywhere: worker 0 parses and checks its
        file (a bad file stops here, no worker asked); every worker parses and checks its
        own and holds it only if it has the same version (``rules_prepare``); if one
        refuses, all drop what they hold (``rules_abort``) and nothing changed anywhere.
        Then worker 0 and every worker swap the held rules in (``rules_commit``). Only a
        failure in that last step (a worker gone, a backend failing to compile) leaves
        mixed versions: an error naming each worker and the version it runs."""
        if self.driver is None or self.engine is None:
            raise RulesReloadError("no rules to reload: the daemon runs the static selector "
                                   "([decision] rules is not set)")
        rules = self.driver.rules
        old = self.engine.rules_version
        rs = self._load_rules(rules, old, None)
        version = _rules_version(rs)
        prepared = await self._ask_all("rules_prepare", {"expect_version": version})
        refused = {w: a for w, a in prepared.items() if isinstance(a, Exception)}
        if refused:
            await self._ask_all("rules_abort", {})
            keep = {"0": old, **{str(w): a.get("running") for w, a in sorted(prepared.items())
                                 if isinstance(a, dict)}}
            raise RulesReloadError(
                f"rules version {version} loaded nowhere (running: "
                + ", ".join(f"worker {w} {v}" for w, v in keep.items()) + "); refused by "
                + "; ".join(f"worker {w}: {e}" for w, e in sorted(refused.items())))
        try:
            self._apply_rules(rs, old)
        except RulesReloadError:
            await self._ask_all("rules_abort", {})
            raise
        committed = await self._ask_all("rules_commit", {"version": version})
        failed = {w: a for w, a in committed.items() if isinstance(a, Exception)}
        runs = {"0": version, **{str(w): a.get("version")
                                 for w, a in sorted(committed.items()) if isinstance(a, dict)}}
        if failed:
            raise RulesReloadError(
                f"rules version {version} loaded on worker(s) {', '.join(sorted(runs))}; "
                "NOT on " + "; ".join(f"worker {w}: {e}" for w, e in sorted(failed.items()))
                + " - the daemon runs mixed rules until a reload succeeds everywhere")
        return {"file": getattr(rules, "path", ""), "version": version, "previous": old,
                "rules": len(self.engine.ruleset.rules),
                "warnings": len(getattr(rules, "warnings", []) or []), "workers": runs}

    def _log_dropped(self) -> int | None:
        d = getattr(self.sink, "dropped", None) if self.sink is not None else None
        return int(d) if isinstance(d, int) else None

    def why(self, params: dict[str, Any]) -> dict[str, Any]:
        text = params.get("flow")
        if not isinstance(text, str):
            raise ValueError("why needs 'flow' (a flow key)")
        key = FlowKey.parse(text)
        hist = self.history.history(key) if self.history is not None else None
        live = any(f.key == key for f in self.datapath.flows())
        if hist is None and not live:
            raise UnknownFlow(f"no decisions recorded for {key} (not a live flow, and not "
                              f"among the last {HISTORY_FLOWS} flows decided)")
        out: dict[str, Any] = {"flow": str(key), "live": live, "decisions": hist or []}
        if self.engine is not None:
            out["rules_version"] = self.engine.rules_version
            state = self.engine.flow_state(key)
            if state is not None:
                out["engine_facts"] = state
        return out

    def rules_reload(self, params: dict[str, Any]) -> dict[str, Any]:
        if self.driver is None or self.engine is None:
            raise RulesReloadError("no rules to reload: the daemon runs the static selector "
                                   "([decision] rules is not set)")
        rules = self.driver.rules
        old = self.engine.rules_version
        if not self.driver.reload():
            err = getattr(rules, "last_error", None) or "reload failed"
            raise RulesReloadError(f"{err}\n(kept rules version {old})")
        return {"file": getattr(rules, "path", ""), "version": self.engine.rules_version,
                "previous": old, "rules": len(self.engine.ruleset.rules),
                "warnings": len(getattr(rules, "warnings", []) or [])}

    # -- the two phases of a reload over workers (a worker's link methods)
    def rules_prepare(self, params: dict[str, Any]) -> dict[str, Any]:
        """Parse and check this worker's rules file and hold it, unless its version is not
        ``expect_version`` (the file was edited after worker 0 read it)."""
        expect = params.get("expect_version")
        if not isinstance(expect, str):
            raise ValueError("rules_prepare needs 'expect_version' (a rules version)")
        if self.driver is None or self.engine is None:
            raise RulesReloadError("no rules here ([decision] rules is not set)")
        old = self.engine.rules_version
        self._prepared = None
        self._prepared = self._load_rules(self.driver.rules, old, expect)
        return {"version": expect, "running": old}

    def rules_commit(self, params: dict[str, Any]) -> dict[str, Any]:
        """Swap in the rules ``rules_prepare`` holds (of ``version``)."""
        rs, self._prepared = self._prepared, None
        if self.engine is None or rs is None or _rules_version(rs) != params.get("version"):
            raise RulesReloadError(f"no rules version {params.get('version')} prepared here")
        old = self.engine.rules_version
        self._apply_rules(rs, old)
        return {"version": self.engine.rules_version, "previous": old}

    def rules_abort(self, params: dict[str, Any]) -> dict[str, Any]:
        held, self._prepared = self._prepared is not None, None
        return {"dropped": held}

    def _load_rules(self, rules: Any, old: str, expect: str | None) -> Any:
        try:
            rs = rules.load()
        except Exception as e:  # RulesSyntaxError, RulesCheckError, OSError
            log.error("rules reload failed, keeping version %s:\n%s", old, e)  # as RulesFile
            with contextlib.suppress(Exception):
                rules.last_error = str(e)
                st = self.engine.stats
                st["reload_errors"] = st.get("reload_errors", 0) + 1
            raise RulesReloadError(f"{e}\n(kept rules version {old})") from None
        version = _rules_version(rs)
        if expect is not None and version != expect:
            raise RulesReloadError(
                f"its rules file is version {version}, not {expect} as loaded by worker 0 "
                f"(edited in between?); kept rules version {old}")
        return rs

    def _apply_rules(self, rs: Any, old: str) -> None:
        assert self.engine is not None
        try:
            self.engine.reload(rs)
        except Exception as e:
            log.error("rules reload failed, keeping version %s: %s", old, e)
            raise RulesReloadError(f"{e}\n(kept rules version {old})") from None
        rearm = getattr(self.driver, "rearm", None)
        if callable(rearm):
            rearm()

    def stats(self, params: dict[str, Any] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"uptime_s": round(time.time() - self.started, 3),
                               "datapath": self.datapath.stats()}
        if self.engine is not None:
            out["engine"] = {"rules_version": self.engine.rules_version,
                             "timers": len(self.engine.timers()), **dict(self.engine.stats)}
        inner_stats = getattr(self.sink, "stats", None) if self.sink is not None else None
        if callable(inner_stats):
            with contextlib.suppress(Exception):
                out["log"] = inner_stats()
        if self.mgmt is not None:
            mg = dict(self.mgmt.counters)
            if self.mgmt_handler is not None:
                mg.update({f"handler_{k}": v for k, v in self.mgmt_handler.counters.items()})
            out["management"] = mg
        if self.monitor is not None:
            out["monitor"] = dict(self.monitor.counters)
        if self.control is not None:
            out["control"] = {"requests": self.control.requests, "errors": self.control.errors}
        return out

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for t in list(self._tasks):
            t.cancel()
        for w in self.workers:
            with contextlib.suppress(Exception):
                await w.close()
        if self.control is not None:
            try:
                await self.control.close()
            except Exception as e:
                log.error("closing the control socket: %s", e)
        if self.monitor is not None:
            with contextlib.suppress(Exception):
                self.monitor.close()
        if self.mgmt is not None:
            with contextlib.suppress(Exception):
                self.mgmt.close()
        self.control = self.monitor = self.mgmt = None


def _rules_version(rs: Any) -> str:
    """A parsed rule set's version, as the engine names it (its source hash, 12 digits)."""
    return str(rs.source_hash or "0" * 12)[:12]


def _owns(datapath: Any, flow: FlowKey) -> bool:
    info = getattr(datapath, "flow_info", None)
    if info is not None:
        return info(flow) is not None
    return any(f.key == flow for f in datapath.flows())


def _event_params(ev: Event) -> dict[str, Any]:
    from vstack.workers import event_to_json

    return event_to_json(ev)


_NOT_FOUND = ("FlowNotFound", "UnknownFlow", "KeyError", "LookupError")


def pick_owner(method: str, params: dict[str, Any], local_err: Exception,
               answers: Mapping[int, Any]) -> dict[str, Any]:
    """The answer of the worker that knows the flow (``switch``/``why``), tagged with its
    id. A worker's other error (e.g. an unknown stack) is raised as it is; if no worker
    knows the flow, ``local_err`` (worker 0's "no such flow"), naming the workers that did
    not answer."""
    from vstack.workers import WorkerError

    for wid, a in sorted(answers.items()):
        if isinstance(a, dict):
            return {**a, "worker": wid}
    for _wid, a in sorted(answers.items()):
        if isinstance(a, WorkerError) and a.kind not in _NOT_FOUND:
            raise a
    down = [f"{a}" for _w, a in sorted(answers.items())
            if isinstance(a, Exception) and not isinstance(a, WorkerError)]
    if down:
        raise type(local_err)(f"{local_err} on the workers that answered; "
                              + "; ".join(down))
    raise local_err


def merge_flows(parts: Mapping[int, Any], limit: int | None = None) -> dict[str, Any]:
    """``flows`` of every worker (a result dict, or the exception a worker raised) as one
    list of at most ``limit``, each flow tagged ``worker``; ``total`` summed (``truncated``
    when flows were left out); unreachable workers under ``unavailable``."""
    flows: list[dict[str, Any]] = []
    dropped: int | None = None
    total = 0
    truncated = False
    unavailable: dict[str, str] = {}
    for wid, part in sorted(parts.items()):
        if isinstance(part, Exception):
            unavailable[str(wid)] = str(part)
            continue
        got = part.get("flows", [])
        total += int(part.get("total", len(got)))
        truncated = truncated or bool(part.get("truncated"))
        for f in got:
            if limit is not None and len(flows) >= limit:
                truncated = True
                break
            flows.append({**f, "worker": wid})
        d = part.get("log_dropped")
        if isinstance(d, int):
            dropped = (dropped or 0) + d
    out: dict[str, Any] = {"flows": flows, "workers": len(parts), "total": total}
    if truncated:
        out["truncated"] = True
    if dropped is not None:
        out["log_dropped"] = dropped
    if unavailable:
        out["unavailable"] = unavailable
    return out


_NOT_SUMMED = frozenset({"run_id", "queue_max", "rules_version", "uptime_s"})  # identities


def sum_counters(dicts: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Key-wise sums of numeric values (nested dicts recursively); a non-numeric value, or
    an identity such as ``run_id``, is kept if every dict agrees on it, else the list of
    the values."""
    out: dict[str, Any] = {}
    keys: list[str] = []
    for d in dicts:
        keys.extend(k for k in d if k not in keys)
    for k in keys:
        vals = [d[k] for d in dicts if k in d]
        if k not in _NOT_SUMMED and all(isinstance(v, int | float) and not isinstance(v, bool)
                                        for v in vals):
            out[k] = sum(vals)
        elif all(isinstance(v, Mapping) for v in vals):
            out[k] = sum_counters(vals)
        elif all(v == vals[0] for v in vals):
            out[k] = vals[0]
        else:
            out[k] = vals
    return out


def merge_stats(parent: Mapping[str, Any], per: Mapping[int, Any]) -> dict[str, Any]:
    """``stats`` of the whole daemon: the parent's own (management, monitor, control, and
    ``log``: the configured decision log, whose ``run_id`` readers use), ``datapath`` /
    ``engine`` summed over the workers that answered and ``log_total`` (every worker's
    log), and every worker's own under ``workers``; unreachable ones under
    ``unavailable``."""
    ok = {w: s for w, s in per.items() if isinstance(s, Mapping)}
    out = dict(parent)
    for part, key in (("datapath", "datapath"), ("engine", "engine"), ("log", "log_total")):
        vals = [s[part] for _w, s in sorted(ok.items()) if isinstance(s.get(part), Mapping)]
        if vals:
            out[key] = sum_counters(vals)
    out["workers"] = {str(w): {k: s[k] for k in ("datapath", "engine", "log") if k in s}
                      for w, s in sorted(ok.items())}
    bad = {str(w): str(s) for w, s in sorted(per.items()) if isinstance(s, Exception)}
    if bad:
        out["unavailable"] = bad
    return out


def _engine_submit(engine: Any) -> Callable[[Event], None]:
    def submit(ev: Event) -> None:
        engine.submit(ev, ev.time)  # events carry the wall-clock time they arrived

    return submit


def local_services(cfg: Config, datapath: Any, engine: Any = None, driver: Any = None,
                   sink: Any = None) -> Services:
    """The services of one process without the sockets: the decision history (wraps the
    sink both the datapath and the engine log to) and, with no engine, the minimal
    management handler. A worker serves ``handlers()`` (+ ``event``) on its link."""
    svc = Services(cfg, datapath, engine, driver, sink)
    hist = HistorySink(datapath.sink)
    datapath.sink = hist
    if engine is not None:
        engine.sink = hist
    svc.history = hist
    if engine is None:
        svc.mgmt_handler = MinimalMgmtHandler(datapath)
    return svc


async def start_services(cfg: Config, datapath: Any, engine: Any = None, driver: Any = None,
                         sink: Any = None, *,
                         on_failure: Callable[[str], None] | None = None,
                         workers: Sequence[Any] = ()) -> Services:
    """Start the management port, the netlink monitor and the control socket on the
    running loop (see the module doc). Never raises: a failure of the management port is
    reported to ``on_failure`` (default: ``datapath.on_failure``) after closing what was
    started; the control socket's and the monitor's failures are logged. ``workers``
    (``vstack.workers.WorkerLink``): the control socket fans out over them and the
    management and monitor events are forwarded to them."""
    loop = asyncio.get_running_loop()
    svc = local_services(cfg, datapath, engine, driver, sink)
    svc.workers = list(workers)
    fail = on_failure or getattr(datapath, "on_failure", None)
    local: Callable[[Event], None] = (_engine_submit(engine) if engine is not None
                                      else svc.mgmt_handler or (lambda _ev: None))
    submit = svc.submit_everywhere(local)
    try:
        from vstack.management import ManagementServer

        svc.mgmt = ManagementServer.from_config(loop, cfg.management, submit)
        if svc.mgmt is not None:
            await svc.mgmt.start()
    except (OSError, ValueError) as e:
        svc.mgmt = None
        msg = f"management.listen {cfg.management.listen!r}: {e}"
        log.error("%s", msg)
        await svc.close()
        if fail is not None:
            fail(msg)
        return svc

    if engine is not None:
        try:
            from vstack.monitor import NetlinkMonitor

            ifnames = list(cfg.monitor.interfaces) or None
            mon = NetlinkMonitor(loop, submit, ifnames=ifnames)
            mon.start()
            svc.monitor = mon
            await asyncio.wait_for(asyncio.shield(mon.ready), timeout=5.0)
            log.info("netlink monitor: %s -> rules",
                     ", ".join(ifnames) if ifnames else "all interfaces")
        except Exception as e:  # OSError, TimeoutError, pyroute2's
            log.error("netlink monitor not started: %s", e)
            if svc.monitor is not None:
                svc.monitor.close()
                svc.monitor = None

    try:
        from vstack.control import ControlServer

        ctl = ControlServer(cfg.control.socket, svc.handlers())
        await ctl.start()
        svc.control = ctl
    except Exception as e:
        log.error("control socket not started (vstack flows/why/switch/stats unavailable): "
                  "%s", e)
    return svc
