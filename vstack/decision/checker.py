"""``vstack rules check``: static checks of a parsed ``RuleSet``.

Diagnostics are ``file:line:col: error|warning: message``.

Errors: unknown events, fields, params, sets, actions and stacks; wrong argument counts and
types; type errors in comparisons (str vs number vs addr, ordering on non-numbers, ``in``
with a prefix set on a non-address); duplicate rule/param/set names.

Warnings: a rule shadowed by a higher-priority rule on the same event whose condition is
implied by its own (no condition, the same condition, or a subset of its ``and`` terms) and
that sets the same flow properties (use_stack, use_interface, ...) without ``for``/``at most
once``, so the lower rule's actions never take effect; two rules on the same event at equal
priority whose conditions may overlap and that choose different stacks; a param that
shadows a field.

Exit codes of ``vstack rules check``: 0 clean, 1 warnings only, 2 errors (or a parse error).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal as Lit

from vstack.decision import ast as A
from vstack.decision.events import EVENT_SCHEMA
from vstack.decision.semantics import (
    ACTIONS,
    SLOT_ACTIONS,
    fields_for,
    known_stacks,
    literal_type,
)

Severity = Lit["error", "warning"]


@dataclass(frozen=True, slots=True)
class Diagnostic:
    filename: str
    line: int
    col: int
    severity: Severity
    message: str

    def __str__(self) -> str:
        return f"{self.filename}:{self.line}:{self.col}: {self.severity}: {self.message}"


class RulesCheckError(ValueError):
    """A rule set with errors (``diagnostics`` holds them; ``str()`` is the first)."""

    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        self.diagnostics = diagnostics
        super().__init__("\n".join(str(d) for d in diagnostics))


def exit_code(diags: Iterable[Diagnostic]) -> int:
    sev = {d.severity for d in diags}
    return 2 if "error" in sev else 1 if "warning" in sev else 0


class _Checker:
    def __init__(self, rs: A.RuleSet) -> None:
        self.rs = rs
        self.diags: list[Diagnostic] = []
        self.params = {p.name: p for p in rs.params}
        self.sets = {s.name: s for s in rs.sets}
        self.stacks = known_stacks()

    def err(self, node: object, msg: str) -> None:
        self._add(node, "error", msg)

    def warn(self, node: object, msg: str) -> None:
        self._add(node, "warning", msg)

    def _add(self, node: object, sev: Severity, msg: str) -> None:
        line = max(int(getattr(node, "line", 1) or 1), 1)
        col = max(int(getattr(node, "col", 1) or 1), 1)
        self.diags.append(Diagnostic(self.rs.filename, line, col, sev, msg))

    # -- top level ----------------------------------------------------------------------
    def run(self) -> list[Diagnostic]:
        seen: dict[str, object] = {}
        items: list[A.Param | A.SetDef] = [*self.rs.params, *self.rs.sets]
        for item in items:
            if item.name in seen:
                self.err(item, f"duplicate definition of {item.name!r}")
            seen[item.name] = item
        for p in self.rs.params:
            if p.value.kind in ("prefix", "addrport"):
                self.err(p.value, f"param {p.name!r}: a param is a number, string, bool, "
                                  "address or duration")
        for s in self.rs.sets:
            self.set_items(s.items)
        names: dict[str, A.Rule] = {}
        for r in self.rs.rules:
            if r.name in names:
                self.err(r, f"duplicate rule name {r.name!r} (first at line {names[r.name].line})")
            names.setdefault(r.name, r)
            self.rule(r)
        self.shadowing()
        self.conflicts()
        self.diags.sort(key=lambda d: (d.line, d.col))
        return self.diags

    def set_items(self, s: A.SetLit) -> set[str]:
        types: set[str] = set()
        for v in s.items:
            if isinstance(v, A.Name):
                p = self.params.get(v.id)
                if p is None:
                    self.err(v, f"unknown param {v.id!r} in set (set elements are literals "
                                "or params)")
                    continue
                t = literal_type(p.value)
            else:
                t = literal_type(v)
            if t == "addrport":
                self.err(v, "address:port is not allowed in a set")
                continue
            types.add("addr" if t == "prefix" else t)
        if len(types) > 1:
            self.err(s, f"set mixes element types ({', '.join(sorted(types))})")
        return types

    # -- one rule -------------------------------------------------------------------------
    def rule(self, r: A.Rule) -> None:
        spec = fields_for(r.event)
        if spec is None:
            self.err(A.Name(r.event, r.event_line, r.event_col),
                     f"unknown event {r.event!r} (known: {', '.join(EVENT_SCHEMA)}, "
                     "mgmt.<type>, timer.<name>)")
            fields: dict[str, str] = {}
            free = True
        else:
            fields, free = spec
        for p in self.params:
            if p in fields and any(n.id == p for n in A.cond_names(r.cond)):
                self.warn(self.params[p], f"param {p!r} shadows the field {p!r} of {r.event}")
        if r.cond is not None:
            self.cond(r.cond, r, fields, free)
        for what, pname in (("for", r.hold_param), ("at most once per", r.once_param)):
            if pname is None:
                continue
            dp = self.params.get(pname)
            if dp is None:
                self.err(r, f"'{what} {pname}': unknown param {pname!r}")
            elif dp.value.kind not in ("duration", "int", "float"):
                self.err(r, f"'{what} {pname}': param {pname!r} is {dp.value.kind}, "
                            "not a duration")
            elif dp.value.value <= 0:
                self.err(r, f"'{what} {pname}': param {pname!r} must be positive")
        if r.hold is not None and r.hold <= 0 and r.hold_param is None:
            self.err(r, "'for' needs a positive duration")
        elif r.hold is not None and r.event == "flow.new":
            self.warn(r, f"rule {r.name!r} never fires: 'for' needs the condition to hold over "
                         "time, and flow.new happens once per flow")
        if r.once_per is not None and r.once_per <= 0 and r.once_param is None:
            self.err(r, "'at most once per' needs a positive duration")
        for a in r.actions:
            self.action(a, r, fields, free)

    def vtype(self, v: A.Value, r: A.Rule, fields: dict[str, str], free: bool) -> str | None:
        """Type of a value in a condition: num, str, bool, addr; None if unknown (reported)
        or free-form ('any')."""
        if isinstance(v, A.Literal):
            t = literal_type(v)
            if t in ("prefix", "addrport"):
                self.err(v, f"{'a prefix' if t == 'prefix' else 'address:port'} can only be "
                            "used " + ("in a set" if t == "prefix" else "in retarget()"))
                return None
            return t
        if v.id in self.params:
            return literal_type(self.params[v.id].value)
        if v.id in fields:
            t = fields[v.id]
            return "num" if t in ("int", "float") else t
        if free:
            return "any"
        if v.id in self.sets:
            self.err(v, f"{v.id!r} is a set; use it with 'in'")
            return None
        self.err(v, f"unknown field or param {v.id!r} for event {r.event!r}")
        return None

    def cond(self, c: A.Cond, r: A.Rule, fields: dict[str, str], free: bool) -> None:
        if isinstance(c, A.And | A.Or):
            for i in c.items:
                self.cond(i, r, fields, free)
        elif isinstance(c, A.Not):
            self.cond(c.item, r, fields, free)
        elif isinstance(c, A.Compare):
            lt = self.vtype(c.left, r, fields, free)
            rt = self.vtype(c.right, r, fields, free)
            if lt is None or rt is None or "any" in (lt, rt):
                return
            if lt != rt:
                self.err(c, f"type error: compares {lt} {_show(c.left)} with {rt} "
                            f"{_show(c.right)}")
            elif c.op not in ("==", "!=") and lt != "num":
                self.err(c, f"type error: {c.op!r} needs numbers, not {lt}")
        elif isinstance(c, A.InSet):
            ot = self.vtype(c.operand, r, fields, free)
            if isinstance(c.set, A.SetName):
                sd = self.sets.get(c.set.id)
                if sd is None:
                    self.err(c.set, f"unknown set {c.set.id!r}")
                    return
                items = sd.items
                types = {("addr" if literal_type(v) == "prefix" else literal_type(v))
                         for v in items.items if isinstance(v, A.Literal)}
                types |= {literal_type(self.params[v.id].value) for v in items.items
                          if isinstance(v, A.Name) and v.id in self.params}
            else:
                types = self.set_items(c.set)
            if ot is None or ot == "any" or not types or len(types) > 1:
                return
            (st,) = types
            if st != ot:
                self.err(c, f"type error: {ot} {_show(c.operand)} tested against a set of {st}")

    def action(self, a: A.Action, r: A.Rule, fields: dict[str, str], free: bool) -> None:
        spec = ACTIONS.get(a.name)
        if spec is None:
            self.err(a, f"unknown action {a.name!r} (known: {', '.join(sorted(ACTIONS))})")
            return
        n = len(a.args)
        if n < spec.min_args or (spec.max_args >= 0 and n > spec.max_args):
            want = (str(spec.min_args) if spec.min_args == spec.max_args
                    else f"{spec.min_args}..{spec.max_args if spec.max_args >= 0 else 'n'}")
            self.err(a, f"{a.name}() takes {want} argument(s), got {n}")
            return
        if spec.kwargs is not None:
            for k, v in a.kwargs:
                if k not in spec.kwargs:
                    self.err(v, f"{a.name}() has no option {k!r}")
        for k, v in a.kwargs:
            if isinstance(v, A.Name) and v.id not in self.params and v.id not in fields:
                self.err(v, f"unknown param or field {v.id!r} in option {k!r}")

        def str_or_name(v: A.Value, what: str) -> str | None:
            """A literal name for a bare word that is no param/field; else check str type."""
            if isinstance(v, A.Name):
                if v.id in self.params:
                    t = literal_type(self.params[v.id].value)
                    if t != "str":
                        self.err(v, f"{what}: param {v.id!r} is {t}, not str")
                    return None
                if v.id in fields:
                    if fields[v.id] != "str":
                        self.err(v, f"{what}: field {v.id!r} is {fields[v.id]}, not str")
                    return None
                return v.id
            if v.kind != "str":
                self.err(v, f"{what}: expected a name or a string, not {v.kind}")
                return None
            return str(v.value)

        if a.name == "use_stack":
            name = str_or_name(a.args[0], "use_stack")
            arg0 = a.args[0]
            if isinstance(arg0, A.Name) and arg0.id in self.params \
                    and self.params[arg0.id].value.kind == "str":
                name = str(self.params[arg0.id].value.value)
            if name is not None and name not in self.stacks:
                self.err(a.args[0], f"unknown stack {name!r} (known: "
                                    f"{', '.join(sorted(self.stacks))})")
        elif a.name == "use_interface":
            str_or_name(a.args[0], "use_interface")
        elif a.name == "retarget":
            v = a.args[0]
            if isinstance(v, A.Literal):
                if v.kind not in ("addr", "addrport", "str"):
                    self.err(v, f"retarget: expected ADDR[:PORT], not {v.kind}")
                elif v.kind == "addrport" and len(a.args) == 2:
                    self.err(a.args[1], "retarget: the port is given twice")
            else:
                t = self.vtype(v, r, fields, free)
                if t not in (None, "any", "str", "addr"):
                    self.err(v, f"retarget: {v.id!r} is {t}, not an address")
            if len(a.args) == 2:
                p = a.args[1]
                if isinstance(p, A.Literal) and (p.kind != "int" or not 0 <= p.value <= 65535):
                    self.err(p, "retarget: the port must be an integer 0..65535")
        elif a.name == "set_dscp":
            v = a.args[0]
            if isinstance(v, A.Literal):
                if v.kind != "int" or not 0 <= v.value <= 63:
                    self.err(v, "set_dscp: DSCP must be an integer 0..63")
            elif self.vtype(v, r, fields, free) not in (None, "any", "num"):
                self.err(v, "set_dscp: DSCP must be a number")
        elif a.name == "log":
            for v in a.args:
                if isinstance(v, A.Name):
                    self.vtype(v, r, fields, free)
        elif a.name in ("start_timer", "stop_timer"):
            tn = a.args[0]
            if not isinstance(tn, A.Name) and not (isinstance(tn, A.Literal) and tn.kind == "str"):
                self.err(tn, f"{a.name}: the timer name is a name or a string")
            if a.name == "start_timer":
                d = a.args[1]
                ok = (isinstance(d, A.Literal) and d.kind in ("duration", "int", "float")
                      and d.value > 0) or (isinstance(d, A.Name) and d.id in self.params
                                           and self.params[d.id].value.kind
                                           in ("duration", "int", "float"))
                if not ok:
                    self.err(d, "start_timer: the period is a positive duration (e.g. 5s)")
                for k, v in a.kwargs:
                    if k in ("repeat", "restart") and not (
                            isinstance(v, A.Literal) and v.kind == "bool"):
                        self.err(v, f"start_timer: {k} is true or false")

    # -- cross-rule checks ------------------------------------------------------------------
    def shadowing(self) -> None:
        by_event: dict[str, list[A.Rule]] = {}
        for r in self.rs.rules:
            by_event.setdefault(r.event, []).append(r)
        for rules in by_event.values():
            for low in rules:
                low_slots = {a.name for a in low.actions if a.name in SLOT_ACTIONS}
                if not low_slots:
                    continue
                for high in rules:
                    if high is low or high.priority <= low.priority:
                        continue
                    if high.hold is not None or high.once_per is not None:
                        continue
                    high_slots = {a.name for a in high.actions if a.name in SLOT_ACTIONS}
                    if not low_slots <= high_slots:
                        continue
                    if _implies(low.cond, high.cond):
                        what = ", ".join(sorted(low_slots))
                        self.warn(low, f"rule {low.name!r} is shadowed by higher-priority rule "
                                       f"{high.name!r} (line {high.line}): its {what} never "
                                       "takes effect")
                        break

    def conflicts(self) -> None:
        rules = list(self.rs.rules)
        for i, a in enumerate(rules):
            sa = _stack_of(a)
            if sa is None:
                continue
            for b in rules[i + 1:]:
                if b.event != a.event or b.priority != a.priority:
                    continue
                sb = _stack_of(b)
                if sb is None or sb == sa:
                    continue
                if not _disjoint(a.cond, b.cond):
                    self.warn(b, f"conflicting actions: rules {a.name!r} (line {a.line}) and "
                                 f"{b.name!r} have the same event and priority {a.priority}, "
                                 f"may both match, and choose different stacks ({sa} vs {sb}); "
                                 "the earlier rule wins")


def _show(v: A.Value) -> str:
    return v.id if isinstance(v, A.Name) else str(v)


def _stack_of(r: A.Rule) -> str | None:
    for a in r.actions:
        if a.name == "use_stack" and a.args:
            v = a.args[0]
            return v.id if isinstance(v, A.Name) else str(v.value)
    return None


def _conjuncts(c: A.Cond | None) -> list[A.Cond]:
    if c is None:
        return []
    if isinstance(c, A.And):
        out: list[A.Cond] = []
        for i in c.items:
            out.extend(_conjuncts(i))
        return out
    if isinstance(c, A.BoolCond) and c.value:
        return []
    return [c]


def _implies(low: A.Cond | None, high: A.Cond | None) -> bool:
    """Conservative: True only if ``low`` obviously implies ``high`` (every ``and`` term of
    ``high`` is also a term of ``low``)."""
    hi = _conjuncts(high)
    lo = _conjuncts(low)
    return all(h in lo for h in hi)


def _atoms(c: A.Cond | None) -> list[tuple[str, str, object]]:
    """(field, op, literal value) for the simple terms of an ``and``-condition."""
    out: list[tuple[str, str, object]] = []
    for t in _conjuncts(c):
        if isinstance(t, A.Compare):
            if isinstance(t.left, A.Name) and isinstance(t.right, A.Literal):
                out.append((t.left.id, t.op, t.right.value))
            elif isinstance(t.right, A.Name) and isinstance(t.left, A.Literal):
                flip = {"<": ">", ">": "<", "<=": ">=", ">=": "<="}.get(t.op, t.op)
                out.append((t.right.id, flip, t.left.value))
        elif (isinstance(t, A.InSet) and isinstance(t.operand, A.Name) and not t.negated
              and isinstance(t.set, A.SetLit)
              and all(isinstance(v, A.Literal) and v.kind not in ("prefix",)
                      for v in t.set.items)):
            vals = frozenset(v.value for v in t.set.items if isinstance(v, A.Literal))
            out.append((t.operand.id, "in", vals))
    return out


def _sat(op: str, v: object, x: object) -> bool:
    """Does the value x satisfy (op v)?"""
    try:
        if op == "==":
            return x == v
        if op == "!=":
            return x != v
        if op == "in":
            return x in v  # type: ignore[operator]
        if op == "<":
            return x < v  # type: ignore[operator]
        if op == "<=":
            return x <= v  # type: ignore[operator]
        if op == ">":
            return x > v  # type: ignore[operator]
        if op == ">=":
            return x >= v  # type: ignore[operator]
    except TypeError:
        return True
    return True


_NEG_OP = {"==": "!=", "!=": "==", "<": ">=", ">=": "<", ">": "<=", "<=": ">"}


def _negation(t: A.Cond) -> A.Cond:
    if isinstance(t, A.Not):
        return t.item
    if isinstance(t, A.InSet):
        return A.InSet(t.operand, t.set, not t.negated)
    if isinstance(t, A.Compare):
        return A.Compare(_NEG_OP[t.op], t.left, t.right)
    return A.Not(t)


def _disjoint(a: A.Cond | None, b: A.Cond | None) -> bool:
    """Conservative: True only if no event can satisfy both conditions."""
    terms_b = _conjuncts(b)
    if any(_negation(t) in terms_b for t in _conjuncts(a)):
        return True
    for fa, oa, va in _atoms(a):
        for fb, ob, vb in _atoms(b):
            if fa != fb:
                continue
            # A witness value must satisfy both; try the constants themselves.
            if oa == "==" and not _sat(ob, vb, va):
                return True
            if ob == "==" and not _sat(oa, va, vb):
                return True
            if oa == "in" and all(not _sat(ob, vb, x) for x in va):  # type: ignore[attr-defined]
                return True
            if ob == "in" and all(not _sat(oa, va, x) for x in vb):  # type: ignore[attr-defined]
                return True
            if isinstance(va, int | float) and isinstance(vb, int | float):
                lo_a, hi_a = _interval(oa, va)
                lo_b, hi_b = _interval(ob, vb)
                lo = (lo_a if lo_a[0] > lo_b[0] else lo_b if lo_b[0] > lo_a[0]
                      else (lo_a[0], lo_a[1] or lo_b[1]))
                hi = (hi_a if hi_a[0] < hi_b[0] else hi_b if hi_b[0] < hi_a[0]
                      else (hi_a[0], hi_a[1] or hi_b[1]))
                if lo[0] > hi[0] or (lo[0] == hi[0] and (lo[1] or hi[1])):
                    return True
    return False


def _interval(op: str, v: float) -> tuple[tuple[float, bool], tuple[float, bool]]:
    """((low, low_open), (high, high_open)) of the values satisfying (op v)."""
    inf = float("inf")
    if op == "<":
        return (-inf, True), (v, True)
    if op == "<=":
        return (-inf, True), (v, False)
    if op == ">":
        return (v, True), (inf, True)
    if op == ">=":
        return (v, False), (inf, True)
    if op == "==":
        return (v, False), (v, False)
    return (-inf, True), (inf, True)


def check(rs: A.RuleSet) -> list[Diagnostic]:
    """All diagnostics for a parsed rule set, sorted by position."""
    return _Checker(rs).run()


def check_or_raise(rs: A.RuleSet) -> list[Diagnostic]:
    """Check; raise ``RulesCheckError`` if there are errors; return the warnings."""
    diags = check(rs)
    errors = [d for d in diags if d.severity == "error"]
    if errors:
        raise RulesCheckError(errors)
    return diags
