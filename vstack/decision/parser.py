"""Parse ``.rules`` text into the AST (``vstack.decision.ast``).

``parse_rules(text, filename)`` returns a ``RuleSet`` or raises ``RulesSyntaxError`` whose
``str()`` is ``file:line:col: message``. The grammar is ``rules.lark`` next to this file.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import replace
from functools import lru_cache
from importlib import resources
from typing import Any

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import (
    UnexpectedCharacters,
    UnexpectedEOF,
    UnexpectedInput,
    UnexpectedToken,
    VisitError,
)

from vstack.decision import ast as A

_DUR_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_DUR_SCALE = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

# Friendlier names for terminals in "expected ..." messages.
_TERMINAL_NAMES = {
    "NAME": "a name", "INT_LIT": "an integer", "FLOAT_LIT": "a number", "STRING": "a string",
    "DURATION": "a duration (e.g. 2s, 500ms)", "COLON": "':'", "LPAR": "'('", "RPAR": "')'",
    "LBRACE": "'{'", "RBRACE": "'}'", "COMMA": "','", "EQUAL": "'='", "DOT": "'.'",
    "COMPOP": "a comparison", "THEN": "'then'", "ON": "'on'", "RULE": "'rule'",
    "PARAM": "'param'", "SET": "'set'", "IF": "'if'", "FOR": "'for'", "AT": "'at'",
    "PRIORITY": "'priority'", "$END": "end of file", "IPV4": "an address",
    "IPV6": "an address", "IPV4_PREFIX": "a prefix", "IPV6_PREFIX": "a prefix",
    "IPV4_PORT": "address:port", "IPV6_PORT": "address:port", "TRUE": "true",
    "FALSE": "false", "NOT_IN": "'not in'",
}


# Words that cannot be names ("at", "most", "once", "per" only mean something after the
# actions, so they stay usable as names).
KEYWORDS = frozenset({"rule", "param", "set", "priority", "on", "if", "for", "then", "and", "or",
                      "not", "in", "true", "false"})


class RulesSyntaxError(ValueError):
    """A ``.rules`` file that does not parse. ``str()`` is ``file:line:col: message``."""

    def __init__(self, filename: str, line: int, col: int, message: str) -> None:
        self.filename = filename
        self.line = line
        self.col = col
        self.message = message
        super().__init__(f"{filename}:{line}:{col}: {message}")


class _Positioned(Exception):
    def __init__(self, line: int, col: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.col = col
        self.message = message


@lru_cache(maxsize=1)
def _parser() -> Lark:
    grammar = resources.files("vstack.decision").joinpath("rules.lark").read_text()
    return Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True)


def parse_duration(text: str) -> float:
    m = _DUR_RE.match(text)
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    return float(m.group(1)) * _DUR_SCALE[m.group(2)]


def _pos(meta_or_tok: Any) -> tuple[int, int]:
    return int(getattr(meta_or_tok, "line", 0) or 0), int(getattr(meta_or_tok, "column", 0) or 0)


def _unescape(s: str) -> str:
    body = s[1:-1]
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), body)


@v_args(meta=True)
class _ToAst(Transformer[Token, Any]):
    def __init__(self) -> None:
        super().__init__()
        self.rule_index = 0

    # -- literals ---------------------------------------------------------------------
    def literal(self, meta: Any, children: list[Token]) -> A.Literal:
        tok = children[0]
        line, col = _pos(tok)
        t, s = tok.type, str(tok)
        try:
            if t == "STRING":
                return A.Literal("str", _unescape(s), line, col)
            if t == "INT_LIT":
                return A.Literal("int", int(s), line, col)
            if t == "FLOAT_LIT":
                return A.Literal("float", float(s), line, col)
            if t in ("TRUE", "FALSE"):
                return A.Literal("bool", t == "TRUE", line, col)
            if t == "DURATION":
                return A.Literal("duration", parse_duration(s), line, col)
            if t in ("IPV4", "IPV6"):
                return A.Literal("addr", str(ipaddress.ip_address(s)), line, col)
            if t in ("IPV4_PREFIX", "IPV6_PREFIX"):
                return A.Literal("prefix", ipaddress.ip_network(s, strict=False), line, col)
            if t == "IPV4_PORT":
                a, p = s.rsplit(":", 1)
            else:  # IPV6_PORT
                a, p = s[1:].rsplit("]:", 1)
            port = int(p)
            if not 0 <= port <= 65535:
                raise ValueError(f"port {port} out of range 0..65535")
            return A.Literal("addrport", (str(ipaddress.ip_address(a)), port), line, col)
        except ValueError as e:
            raise _Positioned(line, col, f"bad literal {s!r}: {e}") from None

    def name(self, meta: Any, children: list[Token]) -> A.Name:
        line, col = _pos(children[0])
        if str(children[0]) in KEYWORDS:
            raise _Positioned(line, col, f"unexpected keyword {str(children[0])!r}")
        return A.Name(str(children[0]), line, col)

    # -- conditions -------------------------------------------------------------------
    def comparison(self, meta: Any, children: list[Any]) -> A.Compare:
        left, op, right = children
        line, col = _pos(meta)
        return A.Compare(str(op), left, right, line, col)

    def set_lit(self, meta: Any, children: list[Any]) -> A.SetLit:
        line, col = _pos(meta)
        return A.SetLit(tuple(c for c in children if c is not None), line, col)

    def set_name(self, meta: Any, children: list[Token]) -> A.SetName:
        line, col = _pos(children[0])
        return A.SetName(str(children[0]), line, col)

    def membership(self, meta: Any, children: list[Any]) -> A.InSet:
        line, col = _pos(meta)
        if len(children) == 3:
            return A.InSet(children[0], children[2], True, line, col)
        return A.InSet(children[0], children[1], False, line, col)

    def and_cond(self, meta: Any, children: list[Any]) -> A.And:
        line, col = _pos(meta)
        return A.And(tuple(children), line, col)

    def or_cond(self, meta: Any, children: list[Any]) -> A.Or:
        line, col = _pos(meta)
        return A.Or(tuple(children), line, col)

    def not_(self, meta: Any, children: list[Any]) -> A.Not:
        line, col = _pos(meta)
        return A.Not(children[0], line, col)

    def bool_cond(self, meta: Any, children: list[Token]) -> A.BoolCond:
        line, col = _pos(children[0])
        return A.BoolCond(children[0].type == "TRUE", line, col)

    # -- rules ------------------------------------------------------------------------
    def kwarg(self, meta: Any, children: list[Any]) -> tuple[str, Any]:
        return (str(children[0]), children[1])

    def action(self, meta: Any, children: list[Any]) -> A.Action:
        line, col = _pos(meta)
        name = str(children[0])
        args: list[A.Value] = []
        kwargs: list[tuple[str, A.Value]] = []
        for c in children[1:]:
            if c is None:
                continue
            if isinstance(c, tuple):
                if any(k == c[0] for k, _ in kwargs):
                    raise _Positioned(line, col, f"duplicate keyword argument {c[0]!r}")
                kwargs.append(c)
            else:
                if kwargs:
                    raise _Positioned(getattr(c, "line", line), getattr(c, "col", col),
                                      "positional argument after keyword argument")
                args.append(c)
        return A.Action(name, tuple(args), tuple(kwargs), line, col)

    def actions(self, meta: Any, children: list[A.Action]) -> tuple[A.Action, ...]:
        return tuple(children)

    def priority(self, meta: Any, children: list[Token]) -> int:
        return int(children[0])

    def event_type(self, meta: Any, children: list[Token]) -> tuple[str, int, int]:
        line, col = _pos(meta)
        return (".".join(str(c) for c in children), line, col)

    def when(self, meta: Any, children: list[Any]) -> tuple[str, Any]:
        return ("when", children[0])

    def hold(self, meta: Any, children: list[Token]) -> tuple[float | None, str | None]:
        return _duration_or_name(children[0])

    def once_per(self, meta: Any, children: list[Token]) -> tuple[float | None, str | None]:
        return _duration_or_name(children[0])

    def rule(self, meta: Any, children: list[Any]) -> A.Rule:
        line, col = _pos(meta)
        name_tok, prio, ev, when, hold, actions, once = children
        index = self.rule_index
        self.rule_index += 1
        return A.Rule(
            name=str(name_tok), event=ev[0], cond=when[1] if when else None,
            actions=actions, priority=prio if prio is not None else 0,
            hold=hold[0] if hold else None, once_per=once[0] if once else None,
            index=index, line=line, col=col, event_line=ev[1], event_col=ev[2],
            hold_param=hold[1] if hold else None, once_param=once[1] if once else None,
        )

    def param_def(self, meta: Any, children: list[Any]) -> A.Param:
        line, col = _pos(meta)
        return A.Param(str(children[0]), children[1], line, col)

    def set_def(self, meta: Any, children: list[Any]) -> A.SetDef:
        line, col = _pos(meta)
        return A.SetDef(str(children[0]), children[1], line, col)


def _duration_or_name(tok: Token) -> tuple[float | None, str | None]:
    if tok.type == "DURATION":
        return parse_duration(str(tok)), None
    return None, str(tok)  # a param: resolved by resolve_durations()


def resolve_durations(rules: tuple[A.Rule, ...], params: dict[str, Any]) -> tuple[A.Rule, ...]:
    """Fill ``hold``/``once_per`` of rules that name a param (``for hold_time``) with its
    value in seconds; an unknown or non-numeric param leaves 0.0 for the checker to report."""
    out = []
    for r in rules:
        if r.hold_param is None and r.once_param is None:
            out.append(r)
            continue
        vals = []
        for name in (r.hold_param, r.once_param):
            v = params.get(name) if name is not None else None
            vals.append(float(v) if isinstance(v, int | float) and not isinstance(v, bool)
                        else 0.0)
        out.append(replace(r, hold=vals[0] if r.hold_param else r.hold,
                           once_per=vals[1] if r.once_param else r.once_per))
    return tuple(out)


def _expected(exc: UnexpectedInput) -> str:
    exp = sorted(getattr(exc, "accepts", None) or getattr(exc, "expected", None)
                 or getattr(exc, "allowed", None) or [])
    names = list(dict.fromkeys(
        _TERMINAL_NAMES.get(e, repr(e.lower().replace("_", " ")) if e.isupper() else e)
        for e in exp))
    if not names:
        return ""
    if len(names) > 6:
        names = [*names[:6], "..."]
    return "; expected " + ", ".join(names)


def _end_pos(text: str) -> tuple[int, int]:
    """Line and column just after the last non-blank character."""
    body = text.rstrip()
    lines = body.split("\n")
    return len(lines), len(lines[-1]) + 1


def parse_rules(text: str, filename: str = "<rules>") -> A.RuleSet:
    """Parse ``.rules`` source. Raises ``RulesSyntaxError`` (``file:line:col: message``)."""
    try:
        tree: Tree[Token] = _parser().parse(text)
    except UnexpectedToken as e:
        tok = e.token
        if tok.type == "$END":
            line, col = _end_pos(text)
            raise RulesSyntaxError(filename, line, col,
                                   f"unexpected end of file{_expected(e)}") from None
        raise RulesSyntaxError(filename, e.line if e.line > 0 else 1, max(e.column, 1),
                               f"unexpected {str(tok)!r}{_expected(e)}") from None
    except UnexpectedCharacters as e:
        pos = e.pos_in_stream or 0
        ch = text[pos] if pos < len(text) else "?"
        raise RulesSyntaxError(filename, e.line, e.column,
                               f"unexpected character {ch!r}{_expected(e)}") from None
    except UnexpectedEOF as e:
        line, col = _end_pos(text)
        raise RulesSyntaxError(filename, line, col,
                               f"unexpected end of file{_expected(e)}") from None
    except UnexpectedInput as e:  # pragma: no cover - other lark input errors
        raise RulesSyntaxError(filename, getattr(e, "line", 1), getattr(e, "column", 1),
                               str(e).splitlines()[0]) from None
    try:
        items = _ToAst().transform(tree).children
    except VisitError as e:
        orig = e.orig_exc
        if isinstance(orig, _Positioned):
            raise RulesSyntaxError(filename, orig.line, orig.col, orig.message) from None
        raise RulesSyntaxError(filename, 1, 1, f"internal parser error: {orig}") from None
    params = tuple(i for i in items if isinstance(i, A.Param))
    rules = resolve_durations(tuple(i for i in items if isinstance(i, A.Rule)),
                              {p.name: p.value.value for p in params})
    sets = tuple(i for i in items if isinstance(i, A.SetDef))
    digest = hashlib.sha256(text.encode()).hexdigest()
    return A.RuleSet(rules, params, sets, filename, digest)


def parse_rules_file(path: str) -> A.RuleSet:
    """Read and parse a file. I/O errors become a ``RulesSyntaxError`` at 1:1."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise RulesSyntaxError(path, 1, 1, f"cannot read: {e}") from None
    return parse_rules(text, path)
