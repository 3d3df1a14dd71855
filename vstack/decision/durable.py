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

durable-rules cannot unregister a ruleset from a ``Host``, and its rulesets live in the
C engine (about 200 KB each): every reload names a new ruleset ``vstack_<hash>_<n>`` on a
fresh ``Host`` and ``close()`` frees the old one with the engine's ``delete_ruleset``.
``Host`` normally starts two ``threading.Timer`` loops (dispatch and timers); ours
overrides ``_run`` so none start - actions are collected synchronously and vstack's timers
are the engine's, sans-IO.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Mapping
from typing import Any

import durable_rules_engine as _dre
from durable.engine import Host

from vstack.decision import ast as A
from vstack.decision.evaluator import RuleIndex, _in_networks, eval_cond

_NEG = {"==": "!=", "!=": "==", "<": ">=", "<=": ">", ">": "<=", ">=": "<"}
_FLIP = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
_DOP = {"!=": "$neq", "<": "$lt", "<=": "$lte", ">": "$gt", ">=": "$gte"}
_counter = itertools.count(1)

Json = Any  # a durable condition (dict), or True/False before folding away


class _QuietHost(Host):
    """A durable ``Host`` that starts no timer threads."""

    def _run(self) -> None:
        return None


def _noop(c: Any) -> None:  # pragma: no cover - never run: we drive the C engine
    return None


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
            runnable = {k: {**v, "run": _noop} for k, v in definition.items()}
            self._host: Host | None = _QuietHost({self.ruleset_name: runnable})
            self._handle = self._host.get_ruleset(self.ruleset_name)._handle
        else:
            self._host = None

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
        text = json.dumps(self.message(event_type, facts), ensure_ascii=False)
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
        self._host = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()
