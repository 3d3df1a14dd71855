"""Reading the decision log into learning samples.

A sample is one flow of one run: the facts of its ``flow.new`` decision (the first decision
of the flow that chose a stack), that stack, the decision's propensity and exploration
flag, and the outcome measured on that stack (``outcomes`` rows of the flow with that
stack: goodput averaged over time, loss averaged over packets, RTT averaged over the
intervals that measured it). A flow switched to another stack later is credited only with
the intervals on its first stack. Flows without any outcome are left out and counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from db.models import DecisionRow, Flow, Outcome, Run


@dataclass(frozen=True, slots=True)
class Utility:
    """``goodput_mbps - lam * loss - mu * rtt_ms`` (``mu`` 0 by default)."""

    lam: float = 10.0
    mu: float = 0.0

    def __call__(self, goodput_bps: float, loss: float, rtt_ms: float | None = None) -> float:
        u = goodput_bps / 1e6 - self.lam * loss
        if self.mu and rtt_ms is not None and rtt_ms >= 0:
            u -= self.mu * rtt_ms
        return u

    def describe(self) -> str:
        s = f"goodput_mbps - {self.lam:g} * loss"
        return s + (f" - {self.mu:g} * rtt_ms" if self.mu else "")


@dataclass(slots=True)
class Sample:
    run_id: int
    flow: str
    time: float
    stack: str
    rule: str | None
    propensity: float
    explored: bool
    facts: dict[str, Any]
    goodput: float = 0.0  # bit/s
    loss: float = 0.0
    rtt: float | None = None
    intervals: int = 0

    def utility(self, u: Utility) -> float:
        return u(self.goodput, self.loss, self.rtt)


@dataclass(slots=True)
class LoadReport:
    runs: list[int] = field(default_factory=list)
    decisions: int = 0
    flows: int = 0
    without_outcome: int = 0


def _agg(rows: Iterable[Outcome]) -> tuple[float, float, float | None, int]:
    dur_sum = good_w = pk_sum = loss_w = 0.0
    goods: list[float] = []
    losses: list[float] = []
    rtts: list[float] = []
    n = 0
    for o in rows:
        n += 1
        d = max(o.interval_end - o.interval_start, 0.0)
        dur_sum += d
        good_w += o.goodput * d
        goods.append(o.goodput)
        pk_sum += o.packets
        loss_w += o.loss * o.packets
        losses.append(o.loss)
        if o.rtt is not None:
            rtts.append(o.rtt)
    goodput = good_w / dur_sum if dur_sum > 0 else sum(goods) / n
    loss = loss_w / pk_sum if pk_sum > 0 else sum(losses) / n
    rtt = sum(rtts) / len(rtts) if rtts else None
    return goodput, loss, rtt, n


def load_samples(engine: Engine, runs: Sequence[int] | None = None,
                 kinds: Sequence[str] = ("live",)) -> tuple[list[Sample], LoadReport]:
    """Samples from the given runs (default: every run of the given kinds)."""
    rep = LoadReport()
    with Session(engine) as s:
        q = select(Run.id).order_by(Run.id)
        q = q.where(Run.id.in_(list(runs))) if runs else q.where(Run.kind.in_(list(kinds)))
        rep.runs = list(s.scalars(q))
        if not rep.runs:
            return [], rep
        first: dict[tuple[int, str], DecisionRow] = {}
        for d in s.scalars(select(DecisionRow)
                           .where(DecisionRow.run_id.in_(rep.runs))
                           .where(DecisionRow.stack.is_not(None))
                           .where(DecisionRow.flow.is_not(None))
                           .order_by(DecisionRow.run_id, DecisionRow.time, DecisionRow.id)):
            rep.decisions += 1
            k = (d.run_id, str(d.flow))
            if k not in first:
                first[k] = d
        feats: dict[tuple[int, str], dict[str, Any]] = {
            (f.run_id, f.key): dict(f.features or {})
            for f in s.scalars(select(Flow).where(Flow.run_id.in_(rep.runs)))}
        outs: dict[tuple[int, str, str], list[Outcome]] = {}
        for o in s.scalars(select(Outcome).where(Outcome.run_id.in_(rep.runs))
                           .order_by(Outcome.id)):
            outs.setdefault((o.run_id, o.flow, o.stack), []).append(o)
    rep.flows = len(first)
    samples: list[Sample] = []
    for (run, flow), d in sorted(first.items(), key=lambda kv: (kv[0][0], kv[1].time, kv[1].id)):
        stack = str(d.stack)
        rows = outs.get((run, flow, stack))
        if not rows:
            rep.without_outcome += 1
            continue
        facts = dict(d.facts or {}) or feats.get((run, flow), {})
        g, loss, rtt, n = _agg(rows)
        samples.append(Sample(run, flow, d.time, stack, d.rule,
                              max(float(d.propensity), 1e-6), bool(d.explored), facts,
                              g, loss, rtt, n))
    return samples, rep


__all__ = ["LoadReport", "Sample", "Utility", "load_samples"]
