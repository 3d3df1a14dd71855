"""What the names in a ``.rules`` file mean: the fields each event offers, the known
stacks and actions, name resolution, and fact normalisation. Shared by the checker and
both evaluators so they agree by construction.

Name resolution (in conditions and action arguments): a ``param`` wins; otherwise the name
is a field (event field, then flow fact). In ``use_stack``/``use_interface``/``start_timer``
arguments a bare name that is neither a param nor a field is a literal name (``dccp``,
``veth1``, ``flip``).

Facts seen by a rule: for ``flow.new`` the classifier's fields (``FLOW_FIELDS``); for every
other event the event's own fields, plus the flow's facts (``FLOW_FIELDS`` and its last
``METRIC_FIELDS``) when the event is about a flow or is applied per flow. On a name clash
the event's field wins (``route.change``'s ``dst`` is the route's).
"""

from __future__ import annotations

import ipaddress
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from vstack.decision import ast as A
from vstack.decision.events import FLOW_FIELDS, METRIC_FIELDS, schema_for

DEFAULT_STACKS = ("udp", "dccp", "tcp", "udplite", "mptcp", "raw")


def known_stacks() -> frozenset[str]:
    try:
        from vstack.execution.stacks.base import STACKS
        names = set(STACKS)
    except ImportError:  # pragma: no cover
        names = set()
    return frozenset(names | set(DEFAULT_STACKS))


# Actions that set one property of a flow: among the rules that fire for one event and
# flow, the highest-priority one wins each slot. Other actions (log, timers) all run.
SLOT_ACTIONS = frozenset({"use_stack", "use_interface", "retarget", "set_dscp", "drop"})
FLOW_ACTIONS = SLOT_ACTIONS


@dataclass(frozen=True, slots=True)
class ActionSpec:
    min_args: int
    max_args: int  # -1: any
    kwargs: frozenset[str] | None  # None: free-form (use_stack options)


ACTIONS: dict[str, ActionSpec] = {
    "use_stack": ActionSpec(1, 1, None),
    "use_interface": ActionSpec(1, 1, frozenset()),
    "retarget": ActionSpec(1, 2, frozenset()),
    "set_dscp": ActionSpec(1, 1, frozenset()),
    "drop": ActionSpec(0, 0, frozenset()),
    "log": ActionSpec(1, -1, frozenset()),
    "start_timer": ActionSpec(2, 2, frozenset({"repeat", "restart"})),
    "stop_timer": ActionSpec(1, 1, frozenset()),
}

TYPE_DEFAULTS: dict[str, Any] = {"str": "", "int": 0, "float": 0.0, "bool": False, "addr": ""}
FIELD_DEFAULTS: dict[str, Any] = {"rtt_ms": -1.0}


def fields_for(event: str) -> tuple[dict[str, str], bool] | None:
    """(field -> type, free_form) for rules on ``event``; None for an unknown event.
    ``free_form``: unknown names are allowed (unknown ``mgmt.*`` types)."""
    schema = schema_for(event)
    if schema is None:
        return None
    free = event.startswith("mgmt.") and not schema
    if event == "flow.new":
        return dict(schema), False
    return {**FLOW_FIELDS, **METRIC_FIELDS, **schema}, free


def literal_type(lit: A.Literal) -> str:
    """The value type of a literal: num, str, bool, addr, prefix, addrport."""
    if lit.kind in ("int", "float", "duration"):
        return "num"
    return lit.kind


def field_type(t: str) -> str:
    return "num" if t in ("int", "float") else t


def is_flow_rule(rule: A.Rule) -> bool:
    """Does this rule act on, or look at, a flow (so a flowless event runs it per flow)?"""
    if any(a.name in FLOW_ACTIONS for a in rule.actions):
        return True
    own = schema_for(rule.event) or {}
    flow_names = set(FLOW_FIELDS) | set(METRIC_FIELDS)
    return any(n.id in flow_names and n.id not in own for n in A.cond_names(rule.cond))


@lru_cache(maxsize=8192)
def _canonical(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        return ""


def canonical_addr(v: Any) -> str:
    return _canonical(str(v))


def coerce(value: Any, t: str) -> Any:
    """Coerce a raw fact to its field type (bad values become the type's default)."""
    if value is None:
        return TYPE_DEFAULTS.get(t, "")
    try:
        if t == "int":
            return value if type(value) is int else int(value)
        if t == "float":
            return _finite(value if type(value) is float else float(value))
        if t == "num":
            if type(value) is int:
                return value
            return _finite(value if type(value) is float else float(value))
        if t == "bool":
            return value if type(value) is bool else str(value).lower() in ("1", "true", "yes")
        if t == "addr":
            return canonical_addr(value) if value != "" else ""
        return value if type(value) is str else str(value)
    except (TypeError, ValueError, OverflowError):
        return TYPE_DEFAULTS.get(t, "")


def _finite(v: float) -> float:
    """NaN -> 0.0 and infinities -> the largest float: rules compare finite numbers."""
    if v != v:
        return 0.0
    if v in (math.inf, -math.inf):
        return math.copysign(sys.float_info.max, v)
    return v


def referenced_fields(rules: tuple[A.Rule, ...], params: Mapping[str, Any]) -> dict[str, str]:
    """Fields (not params) that the conditions of ``rules`` read, with their types.
    Free-form fields take the type of what they are compared with (else str)."""
    out: dict[str, str] = {}
    for r in rules:
        spec = fields_for(r.event)
        known = spec[0] if spec else {}
        for n in A.cond_names(r.cond):
            if n.id in params or n.id in out:
                continue
            out[n.id] = known.get(n.id) or _infer(r.cond, n.id) or "str"
    return out


def _infer(cond: A.Cond | None, name: str) -> str | None:
    found: list[str] = []

    def lit_t(v: A.Value) -> str | None:
        if isinstance(v, A.Literal):
            t = literal_type(v)
            return {"num": "float", "prefix": "addr"}.get(t, t)
        return None

    def walk(c: A.Cond) -> None:
        if isinstance(c, A.Compare):
            if isinstance(c.left, A.Name) and c.left.id == name and (t := lit_t(c.right)):
                found.append(t)
            if isinstance(c.right, A.Name) and c.right.id == name and (t := lit_t(c.left)):
                found.append(t)
        elif isinstance(c, A.InSet):
            if isinstance(c.operand, A.Name) and c.operand.id == name \
                    and isinstance(c.set, A.SetLit):
                for v in c.set.items:
                    if t := lit_t(v):
                        found.append(t)
        elif isinstance(c, A.And | A.Or):
            for i in c.items:
                walk(i)
        elif isinstance(c, A.Not):
            walk(c.item)

    if cond is not None:
        walk(cond)
    return found[0] if found else None


def field_default(name: str, t: str) -> Any:
    if name in FIELD_DEFAULTS:
        return FIELD_DEFAULTS[name]
    return TYPE_DEFAULTS.get(t, "")
