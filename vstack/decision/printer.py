"""AST -> ``.rules`` text (the parser's inverse up to positions and layout).

``format_ruleset(rs)`` re-parses to an equal ``RuleSet`` (positions aside); ``learning/``
can use ``with_params`` to write learned thresholds back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from vstack.decision import ast as A


def format_duration(seconds: float) -> str:
    ms = seconds * 1000.0
    if abs(ms - round(ms)) < 1e-9:
        n = round(ms)
        return f"{n // 1000}s" if n % 1000 == 0 else f"{n}ms"
    return f"{seconds:.9f}".rstrip("0") + "s"


def format_literal(v: A.Literal) -> str:
    if v.kind == "duration":
        return format_duration(float(v.value))
    if v.kind == "float":
        return repr(float(v.value))
    return str(v)


def format_value(v: A.Value) -> str:
    return v.id if isinstance(v, A.Name) else format_literal(v)


def format_set(s: A.SetLit | A.SetName) -> str:
    if isinstance(s, A.SetName):
        return s.id
    return "{" + ", ".join(format_value(v) for v in s.items) + "}"


def format_cond(c: A.Cond) -> str:
    if isinstance(c, A.Compare):
        return f"{format_value(c.left)} {c.op} {format_value(c.right)}"
    if isinstance(c, A.InSet):
        return f"{format_value(c.operand)} {'not in' if c.negated else 'in'} {format_set(c.set)}"
    if isinstance(c, A.BoolCond):
        return "true" if c.value else "false"
    if isinstance(c, A.Not):
        return f"not ({format_cond(c.item)})"
    sep = " and " if isinstance(c, A.And) else " or "
    return sep.join(f"({format_cond(i)})" for i in c.items)


def format_action(a: A.Action) -> str:
    parts = [format_value(v) for v in a.args]
    parts += [f"{k}={format_value(v)}" for k, v in a.kwargs]
    return f"{a.name}({', '.join(parts)})"


def format_rule(r: A.Rule) -> str:
    head = f"rule {r.name}"
    if r.priority:
        head += f" priority {r.priority}"
    out = f"{head}: on {r.event}"
    if r.cond is not None:
        out += f" if {format_cond(r.cond)}"
    if r.hold_param is not None:
        out += f" for {r.hold_param}"
    elif r.hold is not None:
        out += f" for {format_duration(r.hold)}"
    out += " then " + ", ".join(format_action(a) for a in r.actions)
    if r.once_param is not None:
        out += f" at most once per {r.once_param}"
    elif r.once_per is not None:
        out += f" at most once per {format_duration(r.once_per)}"
    return out


def format_ruleset(rs: A.RuleSet) -> str:
    lines = [f"param {p.name} = {format_literal(p.value)}" for p in rs.params]
    lines += [f"set {s.name} = {format_set(s.items)}" for s in rs.sets]
    lines += [format_rule(r) for r in rs.rules]
    return "\n".join(lines) + "\n"


def with_params(rs: A.RuleSet, values: Mapping[str, Any]) -> A.RuleSet:
    """A copy of ``rs`` with some params' values replaced (same kinds)."""
    params = []
    for p in rs.params:
        if p.name in values:
            v = values[p.name]
            kind = p.value.kind
            if kind in ("int", "float") and isinstance(v, float) and not v.is_integer():
                kind = "float"
            params.append(replace(p, value=A.Literal(kind, v)))
        else:
            params.append(p)
    from vstack.decision.parser import resolve_durations
    return replace(rs, params=tuple(params),
                   rules=resolve_durations(rs.rules, {p.name: p.value.value for p in params}))
