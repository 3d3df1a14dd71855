"""Shadow evaluation: which of two runs' stack choices is better, by the logged outcomes.

``vstack replay --compare RUN_ID`` uses this to say whether the candidate rules choose
better stacks than the run they are compared with: per-stack outcome models are fitted on
RUN_ID's measured outcomes (``learning.model.fit_outcomes``, IPS-weighted), and both runs'
choices for the same flows are scored with them (direct method).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from sqlalchemy import Engine

from learning.data import Utility, load_samples
from learning.model import feature_space, fit_outcomes


def shadow_utility(engine: Engine, run_id: int, facts: Mapping[str, Mapping[str, Any]],
                   old: Mapping[str, str | None], new: Mapping[str, str | None],
                   utility: Utility, *, min_flows: int = 20) -> dict[str, Any] | None:
    """Estimated mean utility of ``old`` and ``new`` choices (flow -> stack) over the flows
    both have facts for, from run ``run_id``'s outcomes; None if it has too few.
    A stack ``run_id`` has no outcomes for scores a flow's worst estimate; such flows are
    counted per stack in ``unmodelled``, and ``better`` is ``unknown`` when every changed
    flow involves one (run with exploration to measure them)."""
    samples, _ = load_samples(engine, [run_id])
    if len(samples) < min_flows:
        return None
    space = feature_space(samples)
    if not space.columns:
        return None
    try:
        om = fit_outcomes(space.matrix(samples), samples, utility,
                          min_stack_samples=max(3, min_flows // 4))
    except ValueError:
        return None
    flows = sorted(f for f in facts if f in old and f in new)
    if not flows:
        return None
    modelled = set(om.stacks)
    unmodelled: dict[str, int] = {}
    for f in flows:
        for st in {old[f] or "", new[f] or ""} - modelled:
            unmodelled[st or "(none)"] = unmodelled.get(st or "(none)", 0) + 1
    X = np.array([space.encode(facts[f]) for f in flows], dtype=float)
    u_old = om.value(X, [old[f] or "" for f in flows])
    u_new = om.value(X, [new[f] or "" for f in flows])
    changed = [f for f in flows if old[f] != new[f]]
    if changed and all((old[f] or "") not in modelled or (new[f] or "") not in modelled
                       for f in changed):
        better = "unknown"  # every changed flow involves a stack run_id never measured
    else:
        better = "new" if u_new > u_old else "old" if u_old > u_new else "same"
    return {"utility": utility.describe(), "flows": len(flows), "model_run": run_id,
            "model_flows": om.counts, "old": round(u_old, 4), "new": round(u_new, 4),
            "better": better, "unmodelled": unmodelled}


__all__ = ["shadow_utility"]
