"""``vstack replay``, ``vstack db ...`` and ``vstack learn ...`` (the decision log's commands).

``vstack replay TRACE`` feeds a pcap/pcapng/JSONL trace through the classifier and the
decision engine (``vstack.replay``), writes the decisions to the database as a new run
(``kind=replay``), and with ``--compare RUN_ID`` shows per flow what changed against
another run: shadow evaluation of candidate rules before deploying them.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from learning.cli import app as learn_app
from vstack.cli.app import app, bench_app

db_app = typer.Typer(help="The decision log database (SQLite by default; any SQLAlchemy URL).",
                     no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(learn_app, name="learn")

DB_HELP = ("Database: SQLAlchemy URL or SQLite path (default: $VSTACK_DB, else "
           "/var/lib/vstack/decisions.sqlite)")


def _db_url(url: str | None) -> str:
    import db

    return db.to_url(url or os.environ.get("VSTACK_DB") or None)


def _fail(console: Console, msg: str, code: int = 1) -> typer.Exit:
    console.print(f"[red]error:[/red] {msg}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@db_app.command("upgrade")
def db_upgrade(db_url: str = typer.Option(None, "--db", help=DB_HELP)) -> None:
    """Migrate the database schema to this vstack's newest revision."""
    import db

    err = Console(stderr=True)
    url = _db_url(db_url)
    try:
        engine = db.make_engine(url)
        try:
            db.check_schema(engine, migrate=False)
            typer.echo(f"{db.safe_url(url)}: already at {db.head_revision()}")
            return
        except db.SchemaOutdated:
            before, after = db.upgrade(engine)
        finally:
            engine.dispose()
    except db.DatabaseError as e:
        raise _fail(err, str(e)) from None
    typer.echo(f"{db.safe_url(url)}: upgraded {before or '(empty)'} -> {after}")


@db_app.command("runs")
def db_runs(db_url: str = typer.Option(None, "--db", help=DB_HELP),
            as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the runs in the decision log (ids for --compare and learning)."""
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    import db
    from db.models import DecisionRow, Flow, Outcome, Run

    err = Console(stderr=True)
    try:
        engine = db.open_db(_db_url(db_url), create=False, migrate=False)
    except db.DatabaseError as e:
        raise _fail(err, str(e)) from None
    rows: list[dict[str, Any]] = []
    with Session(engine) as s:
        counts = {}
        for model in (Flow, DecisionRow, Outcome):
            counts[model.__tablename__] = dict(
                s.execute(select(model.run_id, func.count()).group_by(model.run_id)).all())
        for r in s.scalars(select(Run).order_by(Run.id)):
            rows.append({"id": r.id, "kind": r.kind, "started": r.started, "host": r.host,
                         "rules_version": r.rules_version, "source": r.source,
                         "flows": counts["flows"].get(r.id, 0),
                         "decisions": counts["decisions"].get(r.id, 0),
                         "outcomes": counts["outcomes"].get(r.id, 0)})
    engine.dispose()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    t = Table(title="runs")
    for c in ("id", "kind", "started", "host", "rules", "flows", "decisions", "outcomes",
              "source"):
        t.add_column(c)
    import datetime as dt

    for row in rows:
        started = dt.datetime.fromtimestamp(row["started"], dt.UTC).strftime(
            "%Y-%m-%d %H:%M:%S")
        t.add_row(str(row["id"]), row["kind"], started, row["host"],
                  (row["rules_version"] or "")[:12], str(row["flows"]), str(row["decisions"]),
                  str(row["outcomes"]), row["source"] or "")
    Console().print(t)


@app.command("replay")
def replay_cmd(
    trace: str = typer.Argument(..., help="pcap, pcapng or vstack JSONL trace"),
    rules: str = typer.Option("rules/default.rules", "--rules", "-r", help=".rules file"),
    db_url: str = typer.Option(None, "--db", help=DB_HELP),
    no_db: bool = typer.Option(False, "--no-db", help="Do not write a run to the database."),
    compare_run: int = typer.Option(None, "--compare", metavar="RUN_ID",
                                    help="Diff the decisions against this logged run."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    seed: int = typer.Option(0, help="Seed of the engine's exploration draws."),
    exploration: float = typer.Option(0.0, min=0.0, max=1.0,
                                      help="Exploration epsilon (0: the rules' choice)."),
    backend: str = typer.Option("durable", help="Rule backend: durable or reference."),
    no_migrate: bool = typer.Option(False, "--no-migrate",
                                    help="Refuse an old schema instead of upgrading it."),
    show_problems: int = typer.Option(20, help="Print at most this many trace problems."),
    show_flows: int = typer.Option(30, help="--compare: list at most this many changed flows."),
    lam: float = typer.Option(10.0, "--lambda", help="--compare: utility = goodput_mbps - "
                              "λ·loss, estimated from the compared run's outcomes."),
    idle_timeout: float = typer.Option(None, "--idle-timeout", min=0.0,
                                       help="Forget flows idle this long (s), as the "
                                            "datapath does (default: never)."),
) -> None:
    """Replay a trace through the classifier and the decision engine, deterministically."""
    import db
    from vstack.decision.checker import RulesCheckError, check_or_raise
    from vstack.decision.parser import RulesSyntaxError, parse_rules_file
    from vstack.log import DecisionSink, NullSink
    from vstack.log.writer import LogWriter, RunInfo
    from vstack.replay import (
        TraceProblem,
        choices_from_db,
        choices_from_result,
        compare,
        engine_factory,
        replay,
    )

    err = Console(stderr=True)
    out = Console()
    if not os.path.isfile(trace):
        raise _fail(err, f"{trace}: no such file")
    try:
        rs = parse_rules_file(rules)
        check_or_raise(rs)
    except (RulesSyntaxError, RulesCheckError) as e:
        raise _fail(err, str(e), 2) from None
    url = _db_url(db_url)
    writer: LogWriter | None = None
    sink: DecisionSink = NullSink()
    if compare_run is not None or not no_db:
        try:
            if not no_db:
                writer = LogWriter(url, RunInfo(
                    kind="replay", source=os.path.abspath(trace), rules_version=rs.source_hash[:12],
                    config={"rules": os.path.abspath(rules), "seed": seed,
                            "exploration": exploration, "backend": backend}),
                    block=True, migrate=not no_migrate)
                sink = writer
            else:
                db.open_db(url, create=False, migrate=not no_migrate).dispose()
        except db.DatabaseError as e:
            raise _fail(err, str(e)) from None

    shown = [0]

    def on_problem(p: TraceProblem) -> None:
        if shown[0] < show_problems:
            err.print(f"[yellow]{trace}: {p}[/yellow] (skipped)", highlight=False,
                      soft_wrap=True)
        shown[0] += 1

    quiet = as_json or not err.is_terminal
    with Progress(TextColumn("replay"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=err, disable=quiet, transient=True) as prog:
        task = prog.add_task("replay", total=os.path.getsize(trace) or 1)

        def progress(pos: int, size: int) -> None:
            prog.update(task, completed=pos, total=size or 1)

        try:
            result = replay(trace, engine_factory(rs, backend=backend, exploration=exploration,
                                                  seed=seed),
                            sink=sink, on_problem=on_problem, progress=progress,
                            idle_timeout=idle_timeout)
        except KeyboardInterrupt:
            if writer is not None:
                writer.close()
            raise typer.Exit(130) from None
        except OSError as e:
            if writer is not None:
                writer.close()
            raise _fail(err, f"{trace}: {e.strerror or e}") from None
    run_id = None
    if writer is not None:
        writer.close()
        run_id = writer.run_id
        result.run_id = run_id
        if writer.lost or writer.dropped:
            err.print(f"[red]warning:[/red] {writer.lost + writer.dropped} log records were "
                      f"not written ({writer.last_error})")
    if shown[0] > show_problems:
        err.print(f"[yellow]... and {shown[0] - show_problems} more problems[/yellow]")

    comparison = None
    shadow: dict[str, Any] | None = None
    if compare_run is not None:
        from learning.data import Utility
        from learning.shadow import shadow_utility

        try:
            engine = db.open_db(url, create=False, migrate=False)
            try:
                old = choices_from_db(engine, compare_run)
                new = choices_from_result(result)
                comparison = compare(old, new, compare_run, run_id)
                shadow = shadow_utility(engine, compare_run, result.flow_facts,
                                        {f: c.stack for f, c in old.items()},
                                        {f: c.stack for f, c in new.items()}, Utility(lam))
            finally:
                engine.dispose()
        except (db.DatabaseError, LookupError) as e:
            raise _fail(err, str(e)) from None

    st = result.stats
    if as_json:
        doc: dict[str, Any] = {"trace": trace, "rules": rules, "rules_version":
                               rs.source_hash[:12], "run_id": run_id, "stats": st.as_dict(),
                               "problems": [str(p) for p in result.problems]}
        if comparison is not None:
            doc["compare"] = comparison.as_dict()
            doc["compare"]["utility"] = shadow
        typer.echo(json.dumps(doc, indent=2))
        return
    t = Table(title=f"replay of {os.path.basename(trace)} with {rules}")
    t.add_column("what")
    t.add_column("count", justify="right")
    for label, val in (("packets (app->net)", st.packets), ("packets (net->app)", st.packets_in),
                       ("flows", st.flows), ("events submitted", st.events),
                       ("recorded flow.new/timer events (regenerated)", st.events_regenerated),
                       ("timers fired", st.timers), ("decisions", st.decisions),
                       ("non-IP frames", st.non_ip), ("malformed packets", st.malformed),
                       ("orphan replies", st.orphans), ("flows expired (idle)", st.expired),
                       ("trace problems (skipped)", st.problems)):
        t.add_row(label, str(val))
    for stack, n in sorted(st.stacks.items()):
        t.add_row(f"flows on {stack or '(no stack)'}", str(n))
    out.print(t)
    out.print(f"run id: {run_id}" if run_id is not None else "not written to a database")
    if comparison is not None:
        c = comparison.as_dict()
        ct = Table(title=f"compare with run {compare_run}: {c['changed']} of {c['flows']} flows "
                         f"choose another stack ({c['only_old']} only in run {compare_run}, "
                         f"{c['only_new']} only in this replay)")
        for col in ("flow", f"run {compare_run}", "replay"):
            ct.add_column(col)
        for d in comparison.changed[:show_flows]:
            ct.add_row(d.flow, f"{d.old.stack} ({d.old.rule})", f"{d.new.stack} ({d.new.rule})")
        out.print(ct)
        if len(comparison.changed) > show_flows:
            out.print(f"... {len(comparison.changed) - show_flows} more changed flows")
        for k, n in comparison.transitions().items():
            out.print(f"  {k}: {n} flows")
        if shadow is not None:
            out.print(f"estimated utility ({shadow['utility']}, outcome models from run "
                      f"{compare_run}: {shadow['model_flows']} flows per stack) over "
                      f"{shadow['flows']} flows: run {compare_run} {shadow['old']}, this "
                      f"replay {shadow['new']} -> "
                      + {"new": "the replayed rules choose better stacks",
                         "old": f"run {compare_run}'s choices were better",
                         "same": "no difference",
                         "unknown": "unknown"}[shadow["better"]])
            if shadow["unmodelled"]:
                out.print(f"  run {compare_run} measured no flow on "
                          + ", ".join(f"{s} ({n} flows here)"
                                      for s, n in shadow["unmodelled"].items())
                          + ": those choices are not scored; log with exploration "
                            "(decision.exploration > 0) to measure them")
        else:
            out.print(f"(run {compare_run} has too few measured outcomes to estimate utility)")
    sys.stdout.flush()


@bench_app.command("log")
def bench_log(
    records: int = typer.Option(20_000, min=100, help="Records per run."),
    runs: int = typer.Option(5, min=1, help="Alternating runs (medians are printed)."),
    db_url: str = typer.Option(None, "--db", help="Database (default: a temporary SQLite)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Cost of the decision log on the packet path: per-record enqueue time with the
    database up and while it is locked (drops), against a NullSink; write throughput."""
    import sqlite3
    import statistics
    import tempfile
    import time

    from vstack.analysis.flowkey import FlowKey
    from vstack.decision.events import Event
    from vstack.execution.selector import Decision
    from vstack.log import DecisionSink, NullSink
    from vstack.log.writer import LogWriter, RunInfo

    keys = [FlowKey(17, "10.0.0.1", 1024 + i, "10.201.1.2", 9000) for i in range(1000)]
    evs = [Event("flow.metrics", float(i), {"loss": 0.01, "rate_bps": 1e6}, keys[i % 1000])
           for i in range(records)]
    dec = Decision(stack="udp", rule="r", facts={"dport": 9000})
    metrics = {"packets": 10, "bytes": 1000, "rate_bps": 8e3, "loss": 0.0, "rtt_ms": -1.0,
               "interval_s": 1.0}

    def feed(sink: DecisionSink) -> float:
        t0 = time.perf_counter()
        for i, ev in enumerate(evs):
            k = keys[i % 1000]
            if i % 3 == 0:
                sink.event(ev)
            elif i % 3 == 1:
                sink.decision(k, dec, float(i))
            else:
                sink.outcome(k, "udp", float(i), metrics)
        return (time.perf_counter() - t0) / len(evs) * 1e9

    tmp = tempfile.mkdtemp(prefix="vstack-bench-log-")
    res: dict[str, list[float]] = {"null_ns": [], "up_ns": [], "down_ns": [],
                                   "write_per_s": []}
    for r in range(runs):
        res["null_ns"].append(feed(NullSink()))
        path = f"{tmp}/up{r}.sqlite"
        url = db_url or path
        w = LogWriter(url, RunInfo(kind="bench"), queue_max=max(records * 2, 100_000))
        t0 = time.perf_counter()
        res["up_ns"].append(feed(w))
        w.flush(120.0)
        res["write_per_s"].append(records / (time.perf_counter() - t0))
        w.close()
        dpath = f"{tmp}/down{r}.sqlite"
        w = LogWriter(f"sqlite:///{dpath}?timeout=0.01", RunInfo(kind="bench"),
                      queue_max=1000, retry_max=0.5)
        lock = sqlite3.connect(dpath, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        res["down_ns"].append(feed(w))
        dropped = w.dropped
        lock.execute("ROLLBACK")
        lock.close()
        w.close()
    med = {k: round(statistics.median(v), 1) for k, v in res.items()}
    med["up_over_null"] = round(med["up_ns"] / med["null_ns"], 2)
    med["down_dropped_last_run"] = dropped
    med["records"] = records
    if as_json:
        typer.echo(json.dumps(med, indent=2))
        return
    t = Table(title=f"decision log cost ({runs} runs x {records} records, medians)")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("NullSink, ns/record", str(med["null_ns"]))
    t.add_row("LogWriter (db up), ns/record", str(med["up_ns"]))
    t.add_row("LogWriter (db locked: drops), ns/record", str(med["down_ns"]))
    t.add_row("LogWriter / NullSink", str(med["up_over_null"]))
    t.add_row("written, records/s", str(med["write_per_s"]))
    t.add_row("dropped while locked (last run)", str(dropped))
    Console().print(t)
