"""The learning pipeline: samples -> held-out split -> labels -> tree -> ``.rules`` -> report.

The held-out figures are computed on flows the tree never saw: their labels come from
outcome models fitted on the held-out flows alone, and both policies are run through the
rule evaluator (``vstack.decision.evaluator``), i.e. the learned policy is evaluated as the
``.rules`` file that is written, not as the sklearn tree.

Utility estimates of a policy on the held-out flows:

* ``dm``: direct method, the mean over flows of the held-out outcome model's estimate of
  the stack the policy picks (a stack without a model scores that flow's worst estimate);
* ``snips``: self-normalised inverse propensity scoring over the flows where the policy
  agrees with the logged stack (``sum w*u / sum w`` with ``w = 1/propensity``), with the
  number of agreeing flows (``n``) — unbiased but noisy when few flows agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from learning.data import Sample, Utility
from learning.model import (
    FeatureSpace,
    OutcomeModel,
    Policy,
    feature_space,
    fit_outcomes,
    fit_policy,
    policy_rules,
    rules_choice,
)


@dataclass(slots=True)
class LearnConfig:
    utility: Utility
    max_depth: int = 3
    min_leaf: int = 20
    test_size: float = 0.25
    seed: int = 0
    features: Sequence[str] | None = None
    cost_sensitive: bool = True
    min_stack_samples: int = 10
    default_stack: str | None = None  # what the current rules choose when none fires


@dataclass(slots=True)
class LearnResult:
    rules_text: str
    policy: Policy
    space: FeatureSpace
    report: dict[str, Any]
    diagnostics: list[str]


def split(samples: Sequence[Sample], test_size: float,
          seed: int) -> tuple[list[Sample], list[Sample]]:
    """Deterministic split by flow (each sample is one flow)."""
    n = len(samples)
    order = np.random.default_rng(seed).permutation(n)
    k = math.ceil(n * test_size) if 0 < test_size < 1 else 0
    test_idx = set(order[:k].tolist())
    train = [s for i, s in enumerate(samples) if i not in test_idx]
    test = [s for i, s in enumerate(samples) if i in test_idx]
    return train, test


def snips(samples: Sequence[Sample], choice: Sequence[str | None],
          utility: Utility) -> tuple[float, int]:
    num = den = 0.0
    n = 0
    for s, c in zip(samples, choice, strict=True):
        if c == s.stack:
            w = 1.0 / s.propensity
            num += w * s.utility(utility)
            den += w
            n += 1
    return (num / den if den > 0 else float("nan")), n


def evaluate_policy(name: str, samples: Sequence[Sample], X: np.ndarray,
                    choice: Sequence[str | None], labels: Sequence[str],
                    om: OutcomeModel, utility: Utility) -> dict[str, Any]:
    ch = [c if c is not None else "" for c in choice]
    acc = float(np.mean([c == label for c, label in zip(ch, labels, strict=True)])) \
        if labels else float("nan")
    ips, n = snips(samples, ch, utility)
    dist: dict[str, int] = {}
    for c in ch:
        dist[c or "(none)"] = dist.get(c or "(none)", 0) + 1
    return {"policy": name, "accuracy": acc, "utility_dm": om.value(X, ch),
            "utility_snips": ips, "snips_n": n, "stacks": dict(sorted(dist.items()))}


def _r(x: float) -> float | None:
    return None if not math.isfinite(x) else round(x, 4)


def learn(samples: Sequence[Sample], cfg: LearnConfig, *, current: Any = None,
          header: Sequence[str] = ()) -> LearnResult:
    """Fit, write, check and evaluate. ``current``: a parsed ``RuleSet`` to compare with
    (default: the logged choices)."""
    from vstack.decision.checker import check
    from vstack.decision.evaluator import RuleIndex
    from vstack.decision.parser import parse_rules

    if len(samples) < 2 * cfg.min_leaf:
        raise ValueError(f"too few flows with outcomes to learn from: {len(samples)} "
                         f"(need at least {2 * cfg.min_leaf})")
    train, test = split(samples, cfg.test_size, cfg.seed)
    space = feature_space(train, include=cfg.features)
    if not space.columns:
        raise ValueError("no feature varies across the flows: nothing to split on")
    Xtr = space.matrix(train)
    om_tr = fit_outcomes(Xtr, train, cfg.utility, min_leaf=max(5, cfg.min_leaf // 2),
                         min_stack_samples=cfg.min_stack_samples, seed=cfg.seed)
    labels_tr = om_tr.best(Xtr)
    policy = fit_policy(Xtr, labels_tr, space, om_tr, max_depth=cfg.max_depth,
                        min_leaf=cfg.min_leaf, seed=cfg.seed, cost_sensitive=cfg.cost_sensitive)
    head = [*header, f"utility = {cfg.utility.describe()}; tree depth <= {cfg.max_depth}, "
                     f">= {cfg.min_leaf} flows per leaf; features: {', '.join(space.columns)}",
            f"trained on {len(train)} flows; outcome models per stack: "
            + ", ".join(f"{s}={n}" for s, n in om_tr.counts.items())]
    report: dict[str, Any] = {
        "flows": len(samples), "train": len(train), "test": len(test),
        "explored": sum(1 for s in samples if s.explored), "utility": cfg.utility.describe(),
        "features": space.columns, "stacks": om_tr.stacks, "leaves": len(policy.leaves),
        "params": policy.params,
        "warnings": ([f"only {om_tr.stacks[0]} has enough measured flows: the tree can only "
                      f"repeat the logged choice; log with exploration "
                      f"(decision.exploration > 0) to compare stacks"]
                     if len(om_tr.stacks) < 2 else []),
    }
    # held-out evaluation through the rule evaluator
    evals: list[dict[str, Any]] = []
    text0 = policy_rules(policy, header=head).text
    learned_rs = parse_rules(text0, "learned.rules")
    if test:
        Xte = space.matrix(test)
        try:
            om_te = fit_outcomes(Xte, test, cfg.utility, min_leaf=max(5, cfg.min_leaf // 2),
                                 min_stack_samples=max(3, cfg.min_stack_samples // 3),
                                 seed=cfg.seed)
        except ValueError:
            om_te = om_tr
        labels_te = om_te.best(Xte)
        idx = RuleIndex(learned_rs)
        learned = [rules_choice(idx, s.facts) for s in test]
        tree_pred = policy.predict(Xte)
        report["conversion_mismatches"] = sum(
            1 for a, b in zip(learned, tree_pred, strict=True) if a != b)
        evals.append(evaluate_policy("learned", test, Xte, learned, labels_te, om_te,
                                     cfg.utility))
        if current is not None:
            cidx = RuleIndex(current)
            cur = [rules_choice(cidx, s.facts, cfg.default_stack) for s in test]
            evals.append(evaluate_policy(f"current ({current.filename})", test, Xte, cur,
                                         labels_te, om_te, cfg.utility))
        logged = [s.stack for s in test]
        ev = evaluate_policy("logged", test, Xte, logged, labels_te, om_te, cfg.utility)
        ev["utility_observed"] = float(np.mean([s.utility(cfg.utility) for s in test]))
        evals.append(ev)
        evals.append(evaluate_policy("oracle (held-out labels)", test, Xte, labels_te,
                                     labels_te, om_te, cfg.utility))
        for e in evals:
            for k in ("accuracy", "utility_dm", "utility_snips", "utility_observed"):
                if k in e:
                    e[k] = _r(e[k])
    report["evaluation"] = evals
    lines = []
    for e in evals:
        lines.append(f"held-out {e['policy']}: accuracy {e['accuracy']}, utility (DM) "
                     f"{e['utility_dm']}, utility (SNIPS, n={e['snips_n']}) "
                     f"{e['utility_snips']}")
    text = policy_rules(policy, header=[*head, *lines]).text
    rs = parse_rules(text, "learned.rules")
    diags = [str(d) for d in check(rs)]
    return LearnResult(text, policy, space, report, diags)


__all__ = ["LearnConfig", "LearnResult", "evaluate_policy", "learn", "snips", "split"]
