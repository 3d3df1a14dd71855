"""The durable-rules backend: the AST compiled to durable-rules' JSON ruleset form.

Mapping (see docs/rules.md):

* one durable rule per ``.rules`` rule, named ``r<k>``, ``pri`` = its evaluation rank;
  its condition is ``{"m": {"$and": [{"etype": EVENT}, COND]}}``;
* an event is asserted as a *fact* (``{"id": n, "etype": ..., "f_<field>": ...}``) and
  retracted after its actions were collected: durable-rules *consumes* a posted event
  with the first rule that matches, while facts match every rule - we need every match
  (for ``for``-tracking and non-slot actions) and resolve slots by priority ourselves;
* comparisons map to ``$eq``/``$neq``/``$lt``/``$lte``/``$gt``/``$gte``, field against
  field to ``{"$m": "f_other"}``; ``not`` is pushed down to the leaves (durable has no
  ``$not``); params are inlined as constants; constant terms are folded;
* ``x in {a, b}`` becomes ``$or`` of equalities (``not in``: ``$and`` of ``$neq``);
  prefix membership, which durable cannot express, is precomputed into a derived boolean
  fact ``p<k>`` (``RuleIndex.prefix_tests``) before asserting;
* a ``$or`` makes durable fire the rule once per true branch: matches are de-duplicated.

The compiled ruleset is loaded straight into durable-rules' engine
(``durable_rules_engine``, the C core under ``durable.engine.Host``), and events are matched
through the same calls ``durable.engine.Ruleset`` makes, without its ``Closure``/state
round trips. We do not go through ``Host`` because (1) ``Host`` starts two
``threading.Timer`` loops (dispatch and timers) - vstack's timers are the engine's, sans-IO;
(2) ``Host`` cannot unregister a ruleset, and every ruleset lives in the C engine (about
130-200 KB each); (3) ``Host`` serialises with ``json.dumps``, whose floats without a
fraction (``1e-05``, ``1e+20``) durable's own JSON parser rejects (error 204), so we
serialise ourselves (``to_json``: ``1.0e-05``). Every reload names a new ruleset
``vstack_<hash>_<n>`` (a version suffix) and ``close()`` frees the old one with the
engine's ``delete_ruleset``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Mapping
from typing import Any

import durable_rules_engine as _dre

from vstack.decision import ast as A
from vstack.decision.evaluator import RuleIndex, _in_networks, eval_cond

_NEG = {"==": "!=", "!=": "==", "<": ">=", "<=": ">", ">": "<=", ">=": "<"}
_FLIP = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
_DOP = {"!=": "$neq", "<": "$lt", "<=": "$lte", ">": "$gt", ">=": "$gte"}
_counter = itertools.count(1)

Json = Any  # a durable condition (dict), or True/False before folding away


def _float(v: float) -> str:
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"durable-rules cannot represent {v!r}")
    r = repr(v)
    if "e" in r:
        mant, _, exp = r.partition("e")
        if "." not in mant:
            r = f"{mant}.0e{exp}"
    return r


def to_json(v: Any) -> str:
    """JSON as durable-rules' parser reads it (floats always with a fraction)."""
    t = type(v)
    if t is str:
        return json.dumps(v, ensure_ascii=False)
    if t is bool:
        return "true" if v else "false"
    if t is int:
        return str(v)
    if t is float:
        return _float(v)
    if v is None:
        return "null"
    if isinstance(v, Mapping):
        return "{" + ",".join(f"{json.dumps(str(k), ensure_ascii=False)}:{to_json(x)}"
                              for k, x in v.items()) + "}"
    if isinstance(v, list | tuple):
        return "[" + ",".join(to_json(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(int(v))
    if isinstance(v, float):
        return _float(float(v))
    if isinstance(v, str):
        return json.dumps(str(v), ensure_ascii=False)
    raise TypeError(f"cannot send {t.__name__} to durable-rules")


def _odd_float(v: Any) -> bool:
    """A float json.dumps would write in a form durable cannot read."""
    return type(v) is float and v != 0.0 and not 1e-4 <= abs(v) < 1e16


def fkey(name: str) -> str:
    return "f_" + name


class _Compiler:
    def __init__(self, index: RuleIndex) -> None:
        self.index = index

    def side(self, v: A.Value) -> tuple[str, Any]:
        if isinstance(v, A.Literal):
            return "const", v.value
        if v.id in self.index.params:
            return "const", self.index.params[v.id]
        return "field", v.id

    def cond(self, c: A.Cond, neg: bool) -> Json:
        if isinstance(c, A.BoolCond):
            return c.value != neg
        if isinstance(c, A.Not):
            return self.cond(c.item, not neg)
        if isinstance(c, A.And | A.Or):
            conj = isinstance(c, A.And) != neg
            parts = [self.cond(i, neg) for i in c.items]
            if conj:
                if any(p is False for p in parts):
                    return False
                parts = [p for p in parts if p is not True]
                if not parts:
                    return True
                return parts[0] if len(parts) == 1 else {"$and": parts}
            if any(p is True for p in parts):
                return True
            parts = [p for p in parts if p is not False]
            if not parts:
                return False
            return parts[0] if len(parts) == 1 else {"$or": parts}
        if isinstance(c, A.Compare):
            return self.compare(c, neg)
        return self.member(c, neg)

    def compare(self, c: A.Compare, neg: bool) -> Json:
        lk, lv = self.side(c.left)
        rk, rv = self.side(c.right)
        if lk == "const" and rk == "const":
            return eval_cond(c, {}, self.index) != neg
        op = _NEG[c.op] if neg else c.op
        if lk == "const":
            lk, lv, rk, rv, op = rk, rv, lk, lv, _FLIP[op]
        right = {"$m": fkey(rv)} if rk == "field" else rv
        if op == "==":
            return {fkey(lv): right}
        return {_DOP[op]: {fkey(lv): right}}

    def member(self, c: A.InSet, neg: bool) -> Json:
        kind, v = self.side(c.operand)
        if kind == "const":
            return eval_cond(c, {}, self.index) != neg
        want = c.negated == neg  # the membership value that makes the term true
        nets = self.index.networks_of(c.set)
        if nets is not None:
            return {self.index.prefix_key(v, nets): want}
        values = [self.index.literal_value(i) for i in self.index.set_items(c.set)]
        if not values:
            return not want
        if want:
            parts: list[Json] = [{fkey(v): x} for x in values]
            return parts[0] if len(parts) == 1 else {"$or": parts}
        parts = [{"$neq": {fkey(v): x}} for x in values]
        return parts[0] if len(parts) == 1 else {"$and": parts}


def compile_ruleset(index: RuleIndex) -> tuple[dict[str, Any], dict[str, A.Rule]]:
    """(durable ruleset definition without ``run``, durable rule name -> Rule)."""
    comp = _Compiler(index)
    definition: dict[str, Any] = {}
    names: dict[str, A.Rule] = {}
    rank = 0
    for ev in index.event_types():
        for r in index.rules_for(ev):
            rank += 1
            cond = True if r.cond is None else comp.cond(r.cond, False)
            if cond is False:
                continue  # can never match
            test: dict[str, Any] = {"etype": ev}
            m = test if cond is True else {"$and": [test, cond]}
            key = f"r{len(names)}"
            definition[key] = {"all": [{"m": m}], "pri": rank}
            names[key] = r
    return definition, names


class DurableBackend:
    """Matches by asserting the event as a fact into a durable-rules ruleset."""

    name = "durable"

    def __init__(self, index: RuleIndex) -> None:
        self.index = index
        definition, self._rules = compile_ruleset(index)
        self.definition = definition
        version = (index.ruleset.source_hash or "0" * 12)[:12]
        self.ruleset_name = f"vstack_{version}_{next(_counter)}"
        self._handle: int | None = None
        self._ids = itertools.count(1)
        self._keys: dict[str, tuple[str, ...]] = {}
        for ev in index.event_types():
            fields: set[str] = set()
            for r in index.rules_for(ev):
                fields.update(n.id for n in A.cond_names(r.cond) if n.id not in index.params)
            self._keys[ev] = tuple(sorted(fields))
        self._rank = {r.name: i for i, r in enumerate(
            r for ev in index.event_types() for r in index.rules_for(ev))}
        if definition:
            self._handle = _dre.create_ruleset(self.ruleset_name, to_json(definition))

    def message(self, event_type: str, facts: Mapping[str, Any]) -> dict[str, Any]:
        msg: dict[str, Any] = {"id": next(self._ids), "etype": event_type}
        for k in self._keys.get(event_type, ()):
            msg[fkey(k)] = facts.get(k)
        for t in self.index.prefix_tests(event_type):
            msg[t.key] = _in_networks(facts.get(t.field), t.networks)
        return msg

    def match(self, event_type: str, facts: Mapping[str, Any]) -> list[A.Rule]:
        h = self._handle
        if h is None or event_type not in self._keys:
            return []
        msg = self.message(event_type, facts)
        if any(_odd_float(v) for v in msg.values()):
            text = to_json(msg)
        else:
            text = json.dumps(msg, ensure_ascii=False)
        res = _dre.assert_fact(h, text)
        if res[0] != 0:  # 1: no rule matched (nothing stored)
            return []
        seen: set[str] = set()
        try:
            state_handle = res[1]
            out = _dre.start_action_for_state(h, state_handle)
            while out:
                for key in json.loads(out[1]):
                    seen.add(key)
                nxt = _dre.complete_and_start_action(h, state_handle)
                out = (None, nxt) if nxt else None
        finally:
            _dre.retract_fact(h, text)
        rules = [self._rules[k] for k in seen]
        rules.sort(key=lambda r: self._rank[r.name])
        return rules

    def stored_facts(self) -> int:
        """Facts left in the engine (0 unless a match was interrupted)."""
        if self._handle is None:
            return 0
        try:
            return len(json.loads(_dre.get_facts(self._handle, None)))
        except _dre.error:  # no state yet: nothing was ever asserted
            return 0

    def close(self) -> None:
        """Free the ruleset in the C engine (durable's Host cannot unregister it)."""
        if self._handle is not None:
            _dre.delete_ruleset(self._handle)
            self._handle = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()
