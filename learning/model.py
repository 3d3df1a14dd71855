"""Features, labels, the decision tree, and the ``.rules`` file it becomes.

* **Features**: the numeric ``flow.new`` fields the rule language knows (``fields_for``;
  monitoring facts appear there once the engine adds them to ``flow.new``), minus the
  ephemeral source port, plus one-hot columns for string fields with few values (``proto``).
  Only names a rule can test are used, so every split is expressible.
* **Labels**: per stack, a regression tree estimates the utility of that stack from the
  features, fitted on the flows that ran on it, each weighted by ``1/propensity`` (inverse
  propensity weighting: flows the logging policy rarely sent to a stack, i.e. exploration
  rows, count for as many as they stand for). The label of a flow is the stack with the
  best estimate for its context: the context is the regression leaf it falls in. Stacks
  with fewer than ``min_stack_samples`` flows are not candidates.
* **Classifier**: a ``DecisionTreeClassifier`` on (features, label), each flow weighted by
  how much choosing wrong would cost (best minus second-best estimate, plus a floor), so the
  tree spends its splits where the choice matters.
* **Rules**: one rule per leaf (sibling leaves with the same stack are merged first), the
  leaf's path as the condition, every numeric threshold a ``param``, support counts and
  estimates as comments, distinct priorities (leaves are disjoint; priorities keep the
  checker from having to prove it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

from learning.data import Sample, Utility
from vstack.decision.events import Event
from vstack.decision.semantics import fields_for

EXCLUDED = frozenset({"flow", "src", "dst", "sport", "stack", "iface", "tcp_flags"})


@dataclass(slots=True)
class FeatureSpace:
    numeric: list[str]
    types: dict[str, str]  # numeric name -> "int" | "float"
    categorical: dict[str, list[str]]  # name -> categories

    @property
    def columns(self) -> list[str]:
        cols = list(self.numeric)
        for name, cats in self.categorical.items():
            cols.extend(f"{name}=={c}" for c in cats)
        return cols

    def column(self, i: int) -> tuple[str, str | None]:
        """(field, category or None) of column ``i``."""
        n = len(self.numeric)
        if i < n:
            return self.numeric[i], None
        i -= n
        for name, cats in self.categorical.items():
            if i < len(cats):
                return name, cats[i]
            i -= len(cats)
        raise IndexError(i)

    def encode(self, facts: Mapping[str, Any]) -> list[float]:
        row: list[float] = []
        for name in self.numeric:
            v = facts.get(name)
            try:
                f = float(v) if v is not None and not isinstance(v, str) else float(v or 0)
            except (TypeError, ValueError):
                f = 0.0
            row.append(f if math.isfinite(f) else 0.0)
        for name, cats in self.categorical.items():
            v = str(facts.get(name, ""))
            row.extend(1.0 if v == c else 0.0 for c in cats)
        return row

    def matrix(self, samples: Sequence[Sample]) -> np.ndarray:
        return np.array([self.encode(s.facts) for s in samples], dtype=float).reshape(
            len(samples), len(self.columns))


def feature_space(samples: Sequence[Sample], *, include: Sequence[str] | None = None,
                  exclude: Sequence[str] = (), min_count: int = 5,
                  max_categories: int = 8) -> FeatureSpace:
    """The features the samples support (see the module docstring)."""
    spec = fields_for("flow.new")
    schema = spec[0] if spec else {}
    skip = set(EXCLUDED) | set(exclude)
    numeric: list[str] = []
    types: dict[str, str] = {}
    cats: dict[str, list[str]] = {}
    names = list(include) if include else sorted(schema)
    for name in names:
        t = schema.get(name)
        if t is None:
            raise ValueError(f"{name!r} is not a flow.new field a rule can test "
                             f"(known: {', '.join(sorted(schema))})")
        if name in skip and not include:
            continue
        if t in ("int", "float"):
            vals = {s.facts.get(name) for s in samples}
            if len(vals) > 1 or include:
                numeric.append(name)
                types[name] = t
        elif t == "str":
            counts: dict[str, int] = {}
            for s in samples:
                v = str(s.facts.get(name, ""))
                counts[v] = counts.get(v, 0) + 1
            keep = sorted(c for c, n in counts.items() if n >= min_count)
            if 1 < len(keep) <= max_categories:
                cats[name] = keep
    return FeatureSpace(numeric, types, cats)


@dataclass(slots=True)
class OutcomeModel:
    """Per-stack utility estimates (IPS-weighted regression trees)."""

    stacks: list[str]
    models: dict[str, DecisionTreeRegressor]
    counts: dict[str, int]

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Estimated utility, one column per stack in ``stacks``."""
        if len(X) == 0:
            return np.zeros((0, len(self.stacks)))
        return np.column_stack([self.models[s].predict(X) for s in self.stacks])

    def best(self, X: np.ndarray) -> list[str]:
        U = self.predict(X)
        return [self.stacks[int(i)] for i in np.argmax(U, axis=1)]

    def value(self, X: np.ndarray, stacks: Sequence[str]) -> float:
        """Mean estimated utility of choosing ``stacks[i]`` for row i (direct method);
        a stack without a model counts as the worst estimate of that row."""
        if len(X) == 0:
            return float("nan")
        U = self.predict(X)
        idx = {s: i for i, s in enumerate(self.stacks)}
        vals = [U[r, idx[s]] if s in idx else float(U[r].min()) for r, s in enumerate(stacks)]
        return float(np.mean(vals))


def fit_outcomes(X: np.ndarray, samples: Sequence[Sample], utility: Utility, *,
                 min_leaf: int = 10, min_stack_samples: int = 10,
                 seed: int = 0) -> OutcomeModel:
    y = np.array([s.utility(utility) for s in samples], dtype=float)
    w = np.array([1.0 / s.propensity for s in samples], dtype=float)
    stacks_all = sorted({s.stack for s in samples})
    models: dict[str, DecisionTreeRegressor] = {}
    counts: dict[str, int] = {}
    for st in stacks_all:
        mask = np.array([s.stack == st for s in samples])
        counts[st] = int(mask.sum())
        if counts[st] < min_stack_samples:
            continue
        m = DecisionTreeRegressor(min_samples_leaf=min_leaf, max_depth=8, random_state=seed)
        m.fit(X[mask], y[mask], sample_weight=w[mask])
        models[st] = m
    if not models:
        raise ValueError(f"no stack has {min_stack_samples} flows with outcomes "
                         f"(have {counts})")
    return OutcomeModel(sorted(models), models, counts)


@dataclass(slots=True)
class Leaf:
    stack: str
    conds: list[tuple[str, str, Any]]  # (field, op, param name | literal)
    support: int
    label_counts: dict[str, int]
    estimates: dict[str, float]


@dataclass(slots=True)
class Policy:
    space: FeatureSpace
    tree: DecisionTreeClassifier
    leaves: list[Leaf]
    params: dict[str, int | float]  # name -> value
    param_fields: dict[str, str]  # name -> field it thresholds

    def predict(self, X: np.ndarray) -> list[str]:
        return [str(c) for c in self.tree.predict(X)]


def fit_policy(X: np.ndarray, labels: Sequence[str], space: FeatureSpace,
               outcomes: OutcomeModel, *, max_depth: int = 3, min_leaf: int = 20,
               seed: int = 0, cost_sensitive: bool = True) -> Policy:
    U = outcomes.predict(X)
    if cost_sensitive and U.shape[1] > 1:
        top2 = np.sort(U, axis=1)[:, -2:]
        gap = top2[:, 1] - top2[:, 0]
        w = gap + max(float(np.mean(gap)) * 0.05, 1e-6)
    else:
        w = np.ones(len(labels))
    tree = DecisionTreeClassifier(max_depth=max_depth, min_samples_leaf=min_leaf,
                                  random_state=seed)
    tree.fit(X, np.array(labels), sample_weight=w)
    return _to_policy(tree, X, labels, space, outcomes)


def _to_policy(tree: DecisionTreeClassifier, X: np.ndarray, labels: Sequence[str],
               space: FeatureSpace, outcomes: OutcomeModel) -> Policy:
    t = tree.tree_
    classes = [str(c) for c in tree.classes_]
    leaf_of = tree.apply(X)
    labels_arr = np.array(labels)
    U = outcomes.predict(X)

    # collapse: a split whose two subtrees choose the same single stack is that stack
    def node_class(i: int) -> str:
        return classes[int(np.argmax(t.value[i][0]))]

    def pure(i: int) -> str | None:
        if t.children_left[i] == -1:
            return node_class(i)
        a, b = pure(t.children_left[i]), pure(t.children_right[i])
        return a if a is not None and a == b else None

    params: dict[str, int | float] = {}
    param_fields: dict[str, str] = {}
    leaves: list[Leaf] = []

    def rows_under(i: int) -> np.ndarray:
        # samples whose leaf is in the subtree of i
        stack = [i]
        ids: list[int] = []
        while stack:
            j = stack.pop()
            if t.children_left[j] == -1:
                ids.append(j)
            else:
                stack.extend((t.children_left[j], t.children_right[j]))
        return np.isin(leaf_of, ids)

    def walk(i: int, conds: list[tuple[str, str, Any]]) -> None:
        cls = pure(i)
        if cls is not None:
            mask = rows_under(i)
            lab = labels_arr[mask]
            counts = {s: int((lab == s).sum()) for s in sorted(set(lab.tolist()))}
            est = {s: float(U[mask, k].mean()) if mask.any() else float("nan")
                   for k, s in enumerate(outcomes.stacks)}
            leaves.append(Leaf(cls, list(conds), int(mask.sum()), counts, est))
            return
        col = int(t.feature[i])
        thr = float(t.threshold[i])
        name, cat = space.column(col)
        if cat is not None:  # one-hot: left is "not this category"
            walk(int(t.children_left[i]), [*conds, (name, "!=", f'"{cat}"')])
            walk(int(t.children_right[i]), [*conds, (name, "==", f'"{cat}"')])
            return
        pname = f"{name}_t{len(params) + 1}"
        value: int | float = (math.floor(thr) if space.types.get(name) == "int"
                              else float(f"{thr:.6g}"))
        params[pname] = value
        param_fields[pname] = name
        walk(int(t.children_left[i]), [*conds, (name, "<=", pname)])
        walk(int(t.children_right[i]), [*conds, (name, ">", pname)])

    walk(0, [])
    return Policy(space, tree, leaves, params, param_fields)


def _fmt_value(v: int | float) -> str:
    if isinstance(v, int):
        return str(v)
    text = repr(float(v))
    if "e" in text or "E" in text:
        mant, _, exp = text.lower().partition("e")
        if "." not in mant:
            mant += ".0"
        return f"{mant}e{exp}"
    return text


@dataclass(slots=True)
class RulesText:
    text: str
    rule_names: list[str] = field(default_factory=list)


def policy_rules(policy: Policy, *, header: Sequence[str] = (), prefix: str = "learned",
                 event: str = "flow.new") -> RulesText:
    """The ``.rules`` text of ``policy``: params, then one rule per leaf."""
    out: list[str] = [f"# {h}" if h else "#" for h in header]
    if header:
        out.append("")
    for name, value in policy.params.items():
        out.append(f"param {name} = {_fmt_value(value)}"
                   f"  # threshold on {policy.param_fields[name]}")
    if policy.params:
        out.append("")
    names: list[str] = []
    n = len(policy.leaves)
    for k, leaf in enumerate(policy.leaves, 1):
        counts = ", ".join(f"{s}={c}" for s, c in leaf.label_counts.items())
        est = ", ".join(f"{s}={v:.3g}" for s, v in leaf.estimates.items())
        out.append(f"# leaf {k}: support {leaf.support} flows (best stack by estimate: "
                   f"{counts}); estimated utility {est}")
        cond = " and ".join(f"{f} {op} {v}" for f, op, v in leaf.conds)
        name = f"{prefix}_{k}"
        names.append(name)
        when = f" if {cond}" if cond else ""
        out.append(f"rule {name} priority {n - k + 1}: on {event}{when} "
                   f"then use_stack({leaf.stack})")
        out.append("")
    return RulesText("\n".join(out).rstrip() + "\n", names)


def rules_choice(index: Any, facts: Mapping[str, Any], default: str | None = None) -> str | None:
    """The stack a rule set (a ``RuleIndex``) chooses for a ``flow.new`` with ``facts``."""
    from vstack.decision.evaluator import effective, evaluate

    for a in effective(evaluate(index, Event("flow.new", 0.0, dict(facts)))):
        if a.name == "use_stack" and a.args:
            return str(a.args[0])
    return default


__all__ = ["FeatureSpace", "Leaf", "OutcomeModel", "Policy", "RulesText", "feature_space",
           "fit_outcomes", "fit_policy", "policy_rules", "rules_choice"]
