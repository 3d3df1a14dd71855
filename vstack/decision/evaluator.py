"""The reference evaluator: a direct, pure-Python interpretation of the AST.

Semantics (both backends; the durable-rules one is checked against this one):

* For one event (and, for per-flow evaluation, one flow), every rule whose event type is
  the event's and whose condition holds *matches*. Matches are ordered by priority (higher
  first), then by position in the file.
* A name is a param if the rule set defines one, else a fact. Facts are prepared by
  ``RuleIndex.prepare``: every field a condition reads is present, coerced to its type
  (missing -> the type's default: ``""``, ``0``, ``0.0``, ``rtt_ms`` -> ``-1.0``),
  addresses canonical.
* ``x in {...}`` with addresses and prefixes is prefix membership (an address element is a
  /32 or /128); with other literals it is equality with one of them.
* Actions: among the matching rules the highest-priority one wins each flow property
  ("slot": use_stack, use_interface, retarget, set_dscp, drop); ``log``/``start_timer``/
  ``stop_timer`` of every matching rule run (``effective``).

Nothing here touches clocks or sockets; ``for``/``at most once per`` are the engine's
(they need time and per-flow state).
"""

from __future__ import annotations

import ipaddress
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from vstack.decision import ast as A
from vstack.decision.events import Event
from vstack.decision.semantics import (
    SLOT_ACTIONS,
    coerce,
    field_default,
    fields_for,
    referenced_fields,
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
    ">": operator.gt, ">=": operator.ge,
}


@dataclass(frozen=True, slots=True)
class BoundAction:
    """An action with its arguments resolved against the facts and params."""

    name: str
    args: tuple[Any, ...] = ()
    options: tuple[tuple[str, Any], ...] = ()
    rule: str = ""
    priority: int = 0

    def option_dict(self) -> dict[str, Any]:
        return dict(self.options)


@dataclass(frozen=True, slots=True)
class Fired:
    rule: A.Rule
    actions: tuple[BoundAction, ...]


@dataclass(frozen=True, slots=True)
class PrefixTest:
    """A derived boolean fact: ``key`` is True when ``field`` lies in one of ``networks``."""

    key: str
    field: str
    networks: tuple[Network, ...]


@dataclass(slots=True)
class _EventIndex:
    rules: tuple[A.Rule, ...]
    fields: dict[str, str]
    prefix_tests: list[PrefixTest] = field(default_factory=list)


class RuleIndex:
    """A rule set prepared for evaluation: rules per event type in evaluation order, the
    fields their conditions read, params (file values overridden by ``params``), sets."""

    def __init__(self, rs: A.RuleSet, params: Mapping[str, Any] | None = None) -> None:
        self.ruleset = rs
        self.params: dict[str, Any] = {**rs.param_values(), **(params or {})}
        self.sets = rs.set_defs()
        self.by_name = {r.name: r for r in rs.rules}
        self._events: dict[str, _EventIndex] = {}
        self._prefix_keys: dict[tuple[str, tuple[Network, ...]], str] = {}
        self._nets_cache: dict[A.SetLit | A.SetName, tuple[Network, ...] | None] = {}
        self._values_cache: dict[A.SetLit | A.SetName, tuple[Any, ...]] = {}
        grouped: dict[str, list[A.Rule]] = {}
        for r in rs.ordered():
            grouped.setdefault(r.event, []).append(r)
        for ev, rules in grouped.items():
            t = tuple(rules)
            ei = _EventIndex(t, referenced_fields(t, self.params))
            self._events[ev] = ei
            for r in t:
                self._collect_prefix_tests(r.cond, ei)

    # prefix membership tests, shared with the durable backend as derived facts
    def set_items(self, s: A.SetLit | A.SetName) -> tuple[A.Value, ...]:
        if isinstance(s, A.SetName):
            sd = self.sets.get(s.id)
            return sd.items if sd is not None else ()
        return s.items

    def networks_of(self, s: A.SetLit | A.SetName) -> tuple[Network, ...] | None:
        """The set as networks if it holds any prefix; None for a plain value set."""
        try:
            return self._nets_cache[s]
        except KeyError:
            nets = self._networks_of(s)
            self._nets_cache[s] = nets
            return nets

    def _networks_of(self, s: A.SetLit | A.SetName) -> tuple[Network, ...] | None:
        items = [self.literal_value(v) for v in self.set_items(s)]
        lits = [v for v in self.set_items(s) if isinstance(v, A.Literal)]
        if not any(v.kind == "prefix" for v in lits):
            return None
        nets: list[Network] = []
        for v in items:
            if isinstance(v, ipaddress.IPv4Network | ipaddress.IPv6Network):
                nets.append(v)
            else:
                try:
                    nets.append(ipaddress.ip_network(str(v)))
                except ValueError:
                    continue
        return tuple(nets)

    def set_values(self, s: A.SetLit | A.SetName) -> tuple[Any, ...]:
        """The values of a plain (non-prefix) set."""
        try:
            return self._values_cache[s]
        except KeyError:
            vals = tuple(self.literal_value(i) for i in self.set_items(s))
            self._values_cache[s] = vals
            return vals

    def prefix_key(self, name: str, nets: tuple[Network, ...]) -> str:
        return self._prefix_keys[(name, nets)]

    def _collect_prefix_tests(self, c: A.Cond | None, ei: _EventIndex) -> None:
        if c is None:
            return
        if isinstance(c, A.And | A.Or):
            for i in c.items:
                self._collect_prefix_tests(i, ei)
        elif isinstance(c, A.Not):
            self._collect_prefix_tests(c.item, ei)
        elif isinstance(c, A.InSet) and isinstance(c.operand, A.Name) \
                and c.operand.id not in self.params:
            nets = self.networks_of(c.set)
            if nets is None:
                return
            k = (c.operand.id, nets)
            if k not in self._prefix_keys:
                self._prefix_keys[k] = f"p{len(self._prefix_keys)}"
            key = self._prefix_keys[k]
            if all(t.key != key for t in ei.prefix_tests):
                ei.prefix_tests.append(PrefixTest(key, c.operand.id, nets))

    def literal_value(self, v: A.Value) -> Any:
        if isinstance(v, A.Literal):
            return v.value
        return self.params.get(v.id)

    # -- anti-flapping durations (a param may name them; overrides apply) -----------------
    def hold_of(self, r: A.Rule) -> float:
        if r.hold_param is not None and r.hold_param in self.params:
            return float(self.params[r.hold_param])
        return r.hold or 0.0

    def once_of(self, r: A.Rule) -> float:
        if r.once_param is not None and r.once_param in self.params:
            return float(self.params[r.once_param])
        return r.once_per or 0.0

    # -- per event ---------------------------------------------------------------------
    def event_types(self) -> list[str]:
        return list(self._events)

    def rules_for(self, event_type: str) -> tuple[A.Rule, ...]:
        ei = self._events.get(event_type)
        return ei.rules if ei else ()

    def prefix_tests(self, event_type: str) -> list[PrefixTest]:
        ei = self._events.get(event_type)
        return ei.prefix_tests if ei else []

    def prepare(self, event_type: str, raw: Mapping[str, Any]) -> dict[str, Any]:
        """The facts the rules for ``event_type`` see: ``raw`` plus every field their
        conditions read, coerced to its type."""
        facts = dict(raw)
        ei = self._events.get(event_type)
        if ei is None:
            return facts
        for name, t in ei.fields.items():
            v = raw.get(name)
            facts[name] = field_default(name, t) if v is None else coerce(v, t)
        return facts


# -- the reference interpretation --------------------------------------------------------
def _value(v: A.Value, facts: Mapping[str, Any], params: Mapping[str, Any]) -> Any:
    if isinstance(v, A.Literal):
        return v.value
    if v.id in params:
        return params[v.id]
    return facts.get(v.id)


@lru_cache(maxsize=8192)
def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _in_networks(value: Any, nets: Sequence[Network]) -> bool:
    a = _ip(str(value))
    if a is None:
        return False
    return any(a.version == n.version and a in n for n in nets)


def eval_cond(c: A.Cond | None, facts: Mapping[str, Any], index: RuleIndex) -> bool:
    if c is None:
        return True
    params = index.params
    if isinstance(c, A.Compare):
        left, right = _value(c.left, facts, params), _value(c.right, facts, params)
        try:
            return bool(_OPS[c.op](left, right))
        except TypeError:
            return False
    if isinstance(c, A.And):
        return all(eval_cond(i, facts, index) for i in c.items)
    if isinstance(c, A.Or):
        return any(eval_cond(i, facts, index) for i in c.items)
    if isinstance(c, A.Not):
        return not eval_cond(c.item, facts, index)
    if isinstance(c, A.BoolCond):
        return c.value
    # InSet
    v = _value(c.operand, facts, params)
    nets = index.networks_of(c.set)
    found = _in_networks(v, nets) if nets is not None else v in index.set_values(c.set)
    return found != c.negated


class ReferenceBackend:
    """Matches by interpreting the AST."""

    name = "reference"

    def __init__(self, index: RuleIndex) -> None:
        self.index = index

    def match(self, event_type: str, facts: Mapping[str, Any]) -> list[A.Rule]:
        """``facts`` as returned by ``index.prepare``. Rules in evaluation order."""
        return [r for r in self.index.rules_for(event_type) if eval_cond(r.cond, facts, self.index)]

    def close(self) -> None:
        pass


# -- actions ------------------------------------------------------------------------------
def parse_target(text: str) -> tuple[str, int | None]:
    """``ADDR``, ``ADDR:PORT`` or ``[V6]:PORT`` -> (canonical address, port or None)."""
    s = text.strip()
    port: int | None = None
    if s.startswith("["):
        addr, _, rest = s[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"bad target {text!r}")
            port = int(rest[1:])
    elif s.count(":") == 1:
        addr, p = s.split(":")
        port = int(p)
    else:
        addr = s
    if port is not None and not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return str(ipaddress.ip_address(addr)), port


def _arg(v: A.Value, facts: Mapping[str, Any], params: Mapping[str, Any],
         bare_is_name: bool) -> Any:
    if isinstance(v, A.Literal):
        return v.value
    if v.id in params:
        return params[v.id]
    if v.id in facts or not bare_is_name:
        return facts.get(v.id)
    return v.id


@lru_cache(maxsize=256)
def _known_fields(event: str) -> frozenset[str]:
    spec = fields_for(event)
    return frozenset(spec[0]) if spec else frozenset()


def bind(rule: A.Rule, facts: Mapping[str, Any], params: Mapping[str, Any]) -> tuple[
        BoundAction, ...]:
    """Resolve a rule's action arguments. May raise ValueError for a bad dynamic target."""
    out: list[BoundAction] = []
    known = _known_fields(rule.event)
    for a in rule.actions:
        bare = a.name in ("use_stack", "use_interface", "start_timer", "stop_timer")
        args: list[Any] = []
        for v in a.args:
            if bare and isinstance(v, A.Name) and v.id not in params and v.id not in known \
                    and v.id not in facts:
                args.append(v.id)
            else:
                args.append(_arg(v, facts, params, bare))
        if a.name == "retarget":
            first = args[0]
            if isinstance(first, tuple):
                tgt: tuple[str, int | None] = (first[0], first[1])
            else:
                tgt = parse_target(str(first))
            if len(args) == 2:
                tgt = (tgt[0], int(args[1]))
            args = [tgt]
        elif a.name == "log":
            args = [" ".join(str(x) for x in args)]
        opts = tuple((k, _arg(v, facts, params, True)) for k, v in a.kwargs)
        out.append(BoundAction(a.name, tuple(args), opts, rule.name, rule.priority))
    return tuple(out)


def effective(fired: Sequence[Fired]) -> list[BoundAction]:
    """The actions that take effect, in priority order: the first (highest-priority) rule
    wins each slot; non-slot actions all run."""
    taken: set[str] = set()
    out: list[BoundAction] = []
    for f in fired:
        for a in f.actions:
            if a.name in SLOT_ACTIONS:
                if a.name in taken:
                    continue
                taken.add(a.name)
            out.append(a)
    return out


def fire(index: RuleIndex, matched: Sequence[A.Rule], facts: Mapping[str, Any]) -> list[Fired]:
    return [Fired(r, bind(r, facts, index.params)) for r in matched]


def evaluate(rs: A.RuleSet | RuleIndex, event: Event,
             flow_facts: Mapping[str, Any] | None = None,
             params: Mapping[str, Any] | None = None) -> list[Fired]:
    """Rules that match ``event`` (with ``flow_facts`` underneath its fields), in priority
    order, with their bound actions. Pure: no ``for``/``at most once`` (engine state)."""
    index = rs if isinstance(rs, RuleIndex) else RuleIndex(rs, params)
    raw = {**(flow_facts or {}), **event.fields}
    facts = index.prepare(event.type, raw)
    return fire(index, ReferenceBackend(index).match(event.type, facts), facts)
