"""Fossa-style parameter search: tune a ``.rules`` template's ``param`` values.

Each candidate assignment of the params is run through ``vstack replay`` of the given traces
(the live ``DecisionEngine`` with the params overridden, the traces' timestamps as time) and
scored by the mean estimated utility of the stack chosen for each flow on its ``flow.new``
decision. The estimate comes from per-stack outcome models fitted on the decision log
(``learning.model.fit_outcomes``: IPS-weighted regression trees over the flow features), so
a candidate that picks a stack the live run never used for a kind of flow is still scored,
from the flows of that kind that did run on it. A flow whose chosen stack has no model
scores that flow's worst estimate. Later switches (``flow.metrics`` rules) are not credited.

Search: ``grid`` (every combination of each param's values), ``random`` (``budget`` uniform
draws), or ``coord`` (coordinate ascent from the template's values over each param's
values, rounds until no param improves or the budget is spent).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from learning.model import FeatureSpace, OutcomeModel
from vstack.replay import TraceItem, TraceReader, choices_from_result, engine_factory, replay

ParamValues = dict[str, int | float]


@dataclass(frozen=True, slots=True)
class ParamRange:
    lo: float
    hi: float
    steps: int = 9
    integer: bool = False

    def values(self) -> list[int | float]:
        if self.steps <= 1 or self.lo == self.hi:
            return [self._cast(self.lo)]
        out: list[int | float] = []
        for x in np.linspace(self.lo, self.hi, self.steps):
            v = self._cast(float(x))
            if v not in out:
                out.append(v)
        return out

    def draw(self, rng: np.random.Generator) -> int | float:
        return self._cast(float(rng.uniform(self.lo, self.hi)))

    def _cast(self, x: float) -> int | float:
        return round(x) if self.integer else float(f"{x:.6g}")


def parse_range(text: str, current: int | float) -> ParamRange:
    """``lo:hi`` or ``lo:hi:steps``."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"range {text!r}: expected LO:HI or LO:HI:STEPS")
    try:
        lo, hi = float(parts[0]), float(parts[1])
        steps = int(parts[2]) if len(parts) == 3 else 9
    except ValueError:
        raise ValueError(f"range {text!r}: LO and HI must be numbers, STEPS an integer") from None
    if hi < lo or steps < 1:
        raise ValueError(f"range {text!r}: need LO <= HI and STEPS >= 1")
    return ParamRange(lo, hi, steps, isinstance(current, int) and not isinstance(current, bool))


def default_range(current: int | float) -> ParamRange:
    integer = isinstance(current, int) and not isinstance(current, bool)
    if current > 0:
        return ParamRange(0.0, 2.0 * current, 9, integer)
    if current < 0:
        return ParamRange(2.0 * current, 0.0, 9, integer)
    return ParamRange(-1.0, 1.0, 9, integer)


_PARAM_RE = r"^(?P<head>\s*param\s+{name}\s*=\s*)(?P<value>[^\s#]+)"


def set_params(text: str, values: Mapping[str, int | float],
               kinds: Mapping[str, str] | None = None) -> str:
    """``text`` with the ``param`` lines of ``values`` rewritten (comments kept). A param
    whose kind (``RuleSet.param_kinds()``) is ``duration`` is written in seconds (``2.5s``)."""
    for name, v in values.items():
        if (kinds or {}).get(name) == "duration":
            lit = f"{float(v):g}s"
        else:
            lit = str(v) if isinstance(v, int) else repr(float(v))
        pat = re.compile(_PARAM_RE.format(name=re.escape(name)), re.M)
        m = pat.search(text)
        if m is None:
            raise ValueError(f"param {name!r} is not defined in the template")
        text = text[:m.start("value")] + lit + text[m.end("value"):]
    return text


@dataclass(slots=True)
class FossaResult:
    baseline: ParamValues
    baseline_utility: float
    best: ParamValues
    best_utility: float
    evaluations: list[tuple[ParamValues, float]] = field(default_factory=list)
    flows: int = 0
    text: str = ""


class Scorer:
    """Replays the traces under candidate params and scores them with the outcome model."""

    def __init__(self, ruleset: Any, traces: Sequence[str], om: OutcomeModel,
                 space: FeatureSpace, *, backend: str = "reference",
                 on_problem: Callable[[str], None] | None = None) -> None:
        self.ruleset = ruleset
        self.om = om
        self.space = space
        self.backend = backend
        self.items: list[list[TraceItem]] = []
        for path in traces:
            reader = TraceReader(path)
            self.items.append(list(reader))
            if on_problem is not None:
                for p in reader.problems:
                    on_problem(f"{path}: {p}")
        self.flows = 0
        self.cache: dict[tuple[tuple[str, int | float], ...], float] = {}

    def __call__(self, params: ParamValues) -> float:
        key = tuple(sorted(params.items()))
        if key in self.cache:
            return self.cache[key]
        rows: list[list[float]] = []
        stacks: list[str] = []
        for items in self.items:
            res = replay(items, engine_factory(self.ruleset, backend=self.backend,
                                               params=params))
            for flow, choice in choices_from_result(res).items():
                rows.append(self.space.encode(res.flow_facts.get(flow, {})))
                stacks.append(choice.stack or "")
        self.flows = len(rows)
        if not rows:
            raise ValueError("the traces contain no flows to score")
        u = self.om.value(np.array(rows, dtype=float), stacks)
        self.cache[key] = u
        return u


def search(score: Callable[[ParamValues], float], baseline: ParamValues,
           ranges: Mapping[str, ParamRange], *, method: str = "coord", budget: int = 200,
           seed: int = 0) -> FossaResult:
    base_u = score(dict(baseline))
    res = FossaResult(dict(baseline), base_u, dict(baseline), base_u, [(dict(baseline), base_u)])

    def consider(p: ParamValues) -> None:
        u = score(p)
        res.evaluations.append((dict(p), u))
        if u > res.best_utility + 1e-12:
            res.best, res.best_utility = dict(p), u

    names = sorted(ranges)
    if method == "grid":
        grids = [ranges[n].values() for n in names]
        total = int(np.prod([len(g) for g in grids])) if grids else 0
        if total > budget:
            raise ValueError(f"the grid has {total} points, over the budget of {budget}: "
                             f"use fewer steps, --budget, or --search random/coord")
        for combo in itertools.product(*grids):
            consider({**baseline, **dict(zip(names, combo, strict=True))})
    elif method == "random":
        rng = np.random.default_rng(seed)
        for _ in range(budget):
            consider({**baseline, **{n: ranges[n].draw(rng) for n in names}})
    elif method == "coord":
        spent = 0
        improved = True
        while improved and spent < budget:
            improved = False
            for n in names:
                start = dict(res.best)
                for v in ranges[n].values():
                    if spent >= budget:
                        break
                    if v == start.get(n):
                        continue
                    before = res.best_utility
                    consider({**start, n: v})
                    spent += 1
                    if res.best_utility > before + 1e-12:
                        improved = True
    else:
        raise ValueError(f"unknown search {method!r} (grid, random, coord)")
    return res


__all__ = ["FossaResult", "ParamRange", "Scorer", "default_range", "parse_range", "search",
           "set_params"]
