"""``python -m learning ...`` / ``vstack learn ...``: offline rule learning from the log.

* ``fit``: learn a decision tree from the decision log and write it as a ``.rules`` file
  (one rule per leaf, thresholds as params), checked by the rule checker; prints the
  held-out accuracy and utility of the learned rules against the current ones.
* ``fossa``: tune the params of a ``.rules`` template by replaying traces.
* ``synth``: write a synthetic log with a planted policy (demos, tests).

Heavy imports (scikit-learn) happen inside the commands, so ``vstack`` starts fast.
"""

from __future__ import annotations

import json
import os
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Offline rule learning from the decision log (Fossa-style).",
                  no_args_is_help=True, add_completion=False,
                  pretty_exceptions_show_locals=False)

DB_HELP = ("Database: SQLAlchemy URL or SQLite path (default: $VSTACK_DB, else "
           "/var/lib/vstack/decisions.sqlite)")


def _url(url: str | None) -> str:
    import db

    return db.to_url(url or os.environ.get("VSTACK_DB") or None)


def _fail(msg: str, code: int = 1) -> typer.Exit:
    Console(stderr=True).print(f"[red]error:[/red] {msg}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _daemon_runs(engine: Any, runs: list[int]) -> set[str]:
    """The ``daemon_run`` ids (``vstack.workers.run_config``) of the given runs."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from db.models import Run

    with Session(engine) as s:
        return {str(r.config["daemon_run"]) for r in s.scalars(select(Run).where(
            Run.id.in_(runs))) if isinstance(r.config, dict) and r.config.get("daemon_run")}


def _runs_of(engine: Any, daemon_runs: set[str]) -> list[int]:
    """The runs of a worker's log that belong to these daemon runs."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from db.models import Run

    with Session(engine) as s:
        return sorted(r.id for r in s.scalars(select(Run))
                      if isinstance(r.config, dict)
                      and r.config.get("daemon_run") in daemon_runs)


def _load(url: str, runs: list[int] | None, kinds: list[str]) -> Any:
    """Samples from ``url`` and from the logs of the daemon's other workers beside it
    (``<db>-w<k>``, ``vstack run --workers``): their flows are disjoint, so the samples are
    simply joined. ``--run N`` is a run of ``url``; in the other workers' logs (whose run
    ids count on their own) the runs of the same daemon run are taken (the ``daemon_run``
    id every worker's run info holds); ``report.runs`` lists ``url``'s runs."""
    import db
    from learning.data import LoadReport, load_samples
    from vstack.workers import worker_dbs

    samples: list[Any] = []
    total = LoadReport()
    daemon_runs: set[str] = set()
    for i, u in enumerate(worker_dbs(url)):
        try:
            engine = db.open_db(u, create=False, migrate=False)
        except db.DatabaseError as e:
            raise _fail(str(e)) from None
        try:
            mine: list[int] | None = runs or None
            if runs and i == 0:
                daemon_runs = _daemon_runs(engine, runs)
            elif runs:
                mine = _runs_of(engine, daemon_runs)
                if not mine:
                    continue  # this worker logged nothing of those runs
            got, rep = load_samples(engine, mine, kinds)
        finally:
            engine.dispose()
        samples.extend(got)
        if i == 0:
            total.runs = list(rep.runs)
        total.decisions += rep.decisions
        total.flows += rep.flows
        total.without_outcome += rep.without_outcome
    return samples, total


@app.command("fit")
def fit(
    db_url: str = typer.Option(None, "--db", help=DB_HELP),
    out: str = typer.Option("learned.rules", "--out", "-o", help="The .rules file to write."),
    run: list[int] = typer.Option(None, "--run", help="Learn from these runs (repeatable) "
                                  "(default: every live run)."),
    kind: list[str] = typer.Option(["live"], "--kind", help="Run kinds when --run is not given."),
    lam: float = typer.Option(10.0, "--lambda", help="Utility = goodput_mbps - λ·loss."),
    mu: float = typer.Option(0.0, "--mu", help="... - μ·rtt_ms (0: ignore RTT)."),
    max_depth: int = typer.Option(3, min=1, max=12, help="Tree depth."),
    min_leaf: int = typer.Option(20, min=1, help="Fewest flows per leaf."),
    test_size: float = typer.Option(0.25, min=0.0, max=0.9, help="Held-out share of flows."),
    seed: int = typer.Option(0, help="Split and tree seed."),
    feature: list[str] = typer.Option(None, "--feature", help="Use only these flow.new fields."),
    current: str = typer.Option(None, "--current", help="The current .rules file, to compare."),
    default_stack: str = typer.Option(None, help="--current: the stack when no rule fires "
                                      "(default: the logged one)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Learn rules from the log: features, labels by utility, a decision tree, a .rules file."""
    from learning.data import Utility
    from learning.learn import LearnConfig, learn
    from vstack.decision.parser import RulesSyntaxError, parse_rules_file

    url = _url(db_url)
    samples, rep = _load(url, run, kind)
    cur = None
    if current:
        try:
            cur = parse_rules_file(current)
        except RulesSyntaxError as e:
            raise _fail(str(e), 2) from None
    cfg = LearnConfig(Utility(lam, mu), max_depth=max_depth, min_leaf=min_leaf,
                      test_size=test_size, seed=seed, features=feature or None,
                      default_stack=default_stack)
    import db

    header = [f"Learned by `vstack learn fit` from {db.safe_url(url)} runs "
              f"{', '.join(map(str, rep.runs))}: {rep.flows} flows, {len(samples)} with "
              f"outcomes"]
    try:
        res = learn(samples, cfg, current=cur, header=header)
    except ValueError as e:
        raise _fail(str(e)) from None
    errors = [d for d in res.diagnostics if ": error:" in d]
    with open(out, "w", encoding="utf-8") as f:
        f.write(res.rules_text)
    report = {**res.report, "out": out, "runs": rep.runs, "decisions": rep.decisions,
              "without_outcome": rep.without_outcome, "check": res.diagnostics}
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
    else:
        con = Console()
        con.print(f"{len(samples)} flows with outcomes from runs {rep.runs} "
                  f"({rep.without_outcome} without); {report['explored']} explored; "
                  f"train {report['train']}, held out {report['test']}")
        con.print(f"wrote {out}: {report['leaves']} rules, params "
                  + ", ".join(f"{k}={v}" for k, v in res.policy.params.items()))
        t = Table(title=f"held-out evaluation (utility = {report['utility']})")
        for c in ("policy", "accuracy", "utility (DM)", "utility (SNIPS)", "SNIPS n", "stacks"):
            t.add_column(c)
        for ev in report["evaluation"]:
            t.add_row(ev["policy"], str(ev["accuracy"]), str(ev["utility_dm"]),
                      str(ev["utility_snips"]), str(ev["snips_n"]),
                      ", ".join(f"{k}={v}" for k, v in ev["stacks"].items()))
        con.print(t)
        for w in report["warnings"]:
            con.print(f"[yellow]warning:[/yellow] {w}", highlight=False)
        for d in res.diagnostics:
            con.print(d, highlight=False)
        if not res.diagnostics:
            con.print(f"{out}: rules check clean")
    if errors:
        raise typer.Exit(2)


@app.command("fossa")
def fossa_cmd(
    template: str = typer.Argument(..., help=".rules template whose params are searched"),
    trace: list[str] = typer.Option(..., "--trace", "-t", help="Trace(s) to replay."),
    db_url: str = typer.Option(None, "--db", help=DB_HELP + " (for the outcome models)"),
    run: list[int] = typer.Option(None, "--run", help="Outcome models from these runs."),
    kind: list[str] = typer.Option(["live"], "--kind", help="Run kinds when --run is not given."),
    param: list[str] = typer.Option(None, "--param", "-p",
                                    help="NAME=LO:HI[:STEPS]; default: every numeric param "
                                         "over [0, 2·value], 9 steps."),
    method: str = typer.Option("coord", "--search", help="grid, random or coord."),
    budget: int = typer.Option(200, min=1, help="Most candidates to replay."),
    lam: float = typer.Option(10.0, "--lambda", help="Utility = goodput_mbps - λ·loss."),
    seed: int = typer.Option(0),
    out: str = typer.Option(None, "--out", "-o", help="Write the template with the best params."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Search a template's param values that maximise utility over replayed traces."""
    from learning.data import Utility
    from learning.fossa import Scorer, default_range, parse_range, search, set_params
    from learning.model import feature_space, fit_outcomes
    from vstack.decision.checker import RulesCheckError, check_or_raise
    from vstack.decision.parser import RulesSyntaxError, parse_rules

    try:
        with open(template, encoding="utf-8") as f:
            text = f.read()
        rs = parse_rules(text, template)
        check_or_raise(rs)
    except OSError as e:
        raise _fail(f"{template}: {e.strerror or e}") from None
    except (RulesSyntaxError, RulesCheckError) as e:
        raise _fail(str(e), 2) from None
    values = rs.param_values()
    numeric = {k: v for k, v in values.items()
               if isinstance(v, int | float) and not isinstance(v, bool)}
    ranges = {}
    try:
        for p in param or []:
            name, _, rng = p.partition("=")
            if name not in numeric:
                raise ValueError(f"--param {p}: {name!r} is not a numeric param of {template}")
            ranges[name] = parse_range(rng, numeric[name])
    except ValueError as e:
        raise _fail(str(e)) from None
    if not param:
        ranges = {k: default_range(v) for k, v in numeric.items()}
    if not ranges:
        raise _fail(f"{template} has no numeric params to search")
    for tr in trace:
        if not os.path.isfile(tr):
            raise _fail(f"{tr}: no such file")
    utility = Utility(lam)
    samples, _rep = _load(_url(db_url), run, kind)
    if not samples:
        raise _fail("the log has no flows with outcomes to build outcome models from")
    space = feature_space(samples)
    try:
        om = fit_outcomes(space.matrix(samples), samples, utility, seed=seed)
    except ValueError as e:
        raise _fail(str(e)) from None
    err = Console(stderr=True)
    try:
        scorer = Scorer(rs, trace, om, space,
                        on_problem=lambda m: err.print(f"[yellow]{m}[/yellow]",
                                                       highlight=False))
    except OSError as e:
        raise _fail(f"{e.filename}: {e.strerror or e}") from None
    baseline = {k: numeric[k] for k in numeric}
    try:
        res = search(scorer, baseline, ranges, method=method, budget=budget, seed=seed)
    except ValueError as e:
        raise _fail(str(e)) from None
    best_text = set_params(text, {k: v for k, v in res.best.items() if k in ranges},
                           rs.param_kinds())
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(best_text)
    doc = {"template": template, "traces": trace, "flows": scorer.flows,
           "search": method, "candidates": len(res.evaluations),
           "baseline": res.baseline, "baseline_utility": round(res.baseline_utility, 4),
           "best": res.best, "best_utility": round(res.best_utility, 4), "out": out}
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    con = Console()
    t = Table(title=f"fossa search ({method}, {len(res.evaluations)} candidates, "
                    f"{scorer.flows} flows, utility = {utility.describe()})")
    t.add_column("param")
    t.add_column("template")
    t.add_column("best")
    for k in sorted(ranges):
        t.add_row(k, str(res.baseline.get(k)), str(res.best.get(k)))
    t.add_row("utility", f"{res.baseline_utility:.4f}", f"{res.best_utility:.4f}")
    con.print(t)
    if out:
        con.print(f"wrote {out}")


@app.command("synth")
def synth_cmd(
    db_url: str = typer.Option(None, "--db", help=DB_HELP),
    flows: int = typer.Option(2000, min=10),
    threshold: int = typer.Option(600, help="Planted payload_len threshold."),
    exploration: float = typer.Option(0.3, min=0.0, max=1.0),
    seed: int = typer.Option(0),
    trace: str = typer.Option(None, "--trace", help="Also write the flows' first packets "
                              "as a JSONL trace (for replay/fossa)."),
) -> None:
    """Write a synthetic live run with a planted policy (large flows do better on TCP)."""
    import db
    from learning.synth import synthesize

    try:
        rep = synthesize(_url(db_url), flows=flows, seed=seed, threshold=threshold,
                         exploration=exploration, trace=trace)
    except db.DatabaseError as e:
        raise _fail(str(e)) from None
    typer.echo(f"run {rep.run_id}: {rep.flows} flows, {rep.explored} explored, planted "
               f"threshold payload_len > {rep.threshold} -> tcp"
               + (f"; trace {trace}" if trace else ""))
