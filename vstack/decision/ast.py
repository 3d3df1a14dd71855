"""The AST of a ``.rules`` file. Frozen, slotted dataclasses; every node carries the
``line``/``col`` of its first token (1-based), which are left out of equality so that two
conditions written in different places compare equal (the checker relies on that).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any
from typing import Literal as Lit

# Literal kinds. "addr" is an IP address, "prefix" an IP network, "addrport" an
# (address, port) pair (retarget), "duration" seconds as float.
LiteralKind = Lit["int", "float", "str", "bool", "addr", "prefix", "addrport", "duration"]


@dataclass(frozen=True, slots=True)
class Literal:
    kind: LiteralKind
    value: Any  # int, float, str, bool, str (canonical address), IPv4/6Network, (str, int)
    line: int = field(default=0, compare=False)
    col: int = field(default=0, compare=False)

    def __str__(self) -> str:
        if self.kind == "str":
            esc = (str(self.value).replace("\\", "\\\\").replace('"', '\\"')
                   .replace("\n", "\\n").replace("\t", "\\t"))
            return '"' + esc + '"'
        if self.kind == "bool":
            return "true" if self.value else "false"
        if self.kind == "addrport":
            a, p = self.value
            return f"[{a}]:{p}" if ":" in a else f"{a}:{p}"
        if self.kind == "duration":
            return f"{self.value:g}s"
        return str(self.value)


@dataclass(frozen=True, slots=True)
class Name:
    """A bare identifier: an event field, a flow fact, a param, or (in action arguments)
    a stack/interface/timer name. Resolved by the checker and the evaluators."""

    id: str
    line: int = field(default=0, compare=False)
    col: int = field(default=0, compare=False)

    def __str__(self) -> str:
        return self.id


Value = Literal | Name


@dataclass(frozen=True, slots=True)
class Compare:
    op: str  # == != < <= > >=
    left: Value
    right: Value
    line: int = field(default=0, compare=False)
    col: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class SetLit:
    items: tuple[Value, ...]
    line: int = field(default=0, compare=False)
    col: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class SetName:
    id: str
    line: int = field(default=0, compare=False)
    col: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class InSet:
    operand: Value
    set: SetLit | SetName
    negated: bool = False
    line: int = field(default=0, compare=False)
    col: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class And:
    items: tuple[Cond, ...]
    line: int = field(default=0, compare=False)
    col: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Or:
    items: tuple[Cond, ...]
    line: int = field(default=0, compare=False)
    col: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Not:
    item: Cond
    line: int = field(default=0, compare=False)
    col: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class BoolCond:
    value: bool
    line: int = field(default=0, compare=False)
    col: int = field(default=0, compare=False)


Cond = Compare | InSet | And | Or | Not | BoolCond


@dataclass(frozen=True, slots=True)
class Action:
    name: str
    args: tuple[Value, ...] = ()
    kwargs: tuple[tuple[str, Value], ...] = ()
    line: int = field(default=0, compare=False)
    col: int = field(default=0, compare=False)

    def kw(self, key: str) -> Value | None:
        for k, v in self.kwargs:
            if k == key:
                return v
        return None


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    event: str
    cond: Cond | None
    actions: tuple[Action, ...]
    priority: int = 0
    hold: float | None = None  # "for DURATION": the condition must hold this long (seconds)
    once_per: float | None = None  # "at most once per DURATION" (seconds), per flow
    index: int = 0  # position in the file, 0-based: ties at equal priority go to the earlier
    hold_param: str | None = None  # "for NAME": the param giving ``hold``
    once_param: str | None = None  # "at most once per NAME"
    line: int = field(default=0, compare=False)
    col: int = field(default=0, compare=False)
    event_line: int = field(default=0, compare=False)
    event_col: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    value: Literal
    line: int = field(default=0, compare=False)
    col: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class SetDef:
    name: str
    items: SetLit
    line: int = field(default=0, compare=False)
    col: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class RuleSet:
    rules: tuple[Rule, ...]
    params: tuple[Param, ...] = ()
    sets: tuple[SetDef, ...] = ()
    filename: str = "<rules>"
    source_hash: str = ""  # sha256 of the source text (the rules version)

    def param_values(self) -> dict[str, Any]:
        return {p.name: p.value.value for p in self.params}

    def param_kinds(self) -> dict[str, str]:
        return {p.name: p.value.kind for p in self.params}

    def set_defs(self) -> dict[str, SetLit]:
        return {s.name: s.items for s in self.sets}

    def ordered(self) -> tuple[Rule, ...]:
        """Rules in evaluation order: higher priority first, then file order."""
        return tuple(sorted(self.rules, key=lambda r: (-r.priority, r.index)))


def as_network(lit: Literal) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """An address or prefix literal as a network (an address is a /32 or /128)."""
    if lit.kind == "prefix":
        net: ipaddress.IPv4Network | ipaddress.IPv6Network = lit.value
        return net
    if lit.kind == "addr":
        return ipaddress.ip_network(lit.value)
    return None


def cond_names(cond: Cond | None) -> list[Name]:
    """Every Name referenced by a condition, in order."""
    out: list[Name] = []

    def walk(c: Cond) -> None:
        if isinstance(c, Compare):
            for v in (c.left, c.right):
                if isinstance(v, Name):
                    out.append(v)
        elif isinstance(c, InSet):
            if isinstance(c.operand, Name):
                out.append(c.operand)
            if isinstance(c.set, SetLit):
                out.extend(v for v in c.set.items if isinstance(v, Name))
        elif isinstance(c, And | Or):
            for i in c.items:
                walk(i)
        elif isinstance(c, Not):
            walk(c.item)

    if cond is not None:
        walk(cond)
    return out
