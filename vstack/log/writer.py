"""``LogWriter``: the decision log's ``DecisionSink``, batching rows into SQLAlchemy.

Design (the "no hidden threads in the core" rule): the datapath and the decision engine run
on one asyncio loop and call ``event``/``decision``/``outcome``/``flow_seen``. Those calls
only append a tuple to a bounded ``collections.deque`` and return: no I/O, no lock, no
serialisation on the packet path. When the queue is full the record is dropped and
``dropped`` counts it; the caller never waits.

The database side is this *adapter's* one dedicated, documented thread
(``vstack-log-writer``): SQLAlchemy and the SQLite/PostgreSQL drivers are blocking, so
they run there, draining up to ``batch`` records at a time into one transaction of
``executemany`` inserts. If the database is slow, locked or down, the writer keeps the
failed batch, retries it with a back-off (at most ``retry_max`` seconds apart), and the
queue fills up to ``queue_max`` and then drops: memory stays bounded by
``queue_max + batch`` records whatever the database does.

``deque.append``/``popleft`` are atomic in CPython, so the two sides share nothing else;
the counters are each written by one side only.

Opening the database happens in the constructor, on the caller's thread: an unreachable
URL or an outdated schema raises a ``db.DatabaseError`` there, at start, with a message for
the user, never later.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Engine, Table, bindparam, insert, update
from sqlalchemy.exc import (
    DisconnectionError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout

import db as dbmod
from db.models import DecisionRow, EventRow, Flow, Outcome, Run
from vstack.analysis.flowkey import FlowKey
from vstack.decision.events import Event
from vstack.execution.selector import Decision


@dataclass(frozen=True, slots=True)
class RunInfo:
    """What the ``runs`` row says about this run."""

    config: Mapping[str, Any] = field(default_factory=dict)
    rules_version: str | None = None
    host: str = field(default_factory=socket.gethostname)
    kind: str = "live"  # "live" or "replay"
    source: str | None = None  # the trace, for a replay
    started: float | None = None  # None: now (wall clock)


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: FlowKeys and other objects become strings, non-finite
    floats become None, mappings and sequences are copied."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    return str(value)


def format_target(target: tuple[str, int | None] | None) -> str | None:
    if target is None:
        return None
    addr, port = target
    if port is None:
        return addr
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def decision_row(run_id: int, flow: FlowKey | str | None, d: Decision,
                 now: float) -> dict[str, Any]:
    """The ``decisions`` row for one decision (also used by replay)."""
    return {
        "run_id": run_id,
        "time": float(now),
        "flow": None if flow is None else str(flow),
        "rule": d.rule,
        "rules_version": d.rules_version,
        "facts": jsonable(d.facts),
        "stack": d.stack,
        "interface": d.interface,
        "target": format_target(d.target),
        "dscp": d.dscp,
        "drop": bool(d.drop),
        "propensity": float(d.propensity),
        "explored": bool(d.explored),
    }


def outcome_row(run_id: int, flow: FlowKey | str, stack: str, now: float,
                metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The ``outcomes`` row for one ``flow.metrics`` interval (fields as in METRIC_FIELDS)."""

    def num(name: str, default: float = 0.0) -> float:
        v = metrics.get(name, default)
        try:
            f = float(v)
        except (TypeError, ValueError):
            return default
        return f if math.isfinite(f) else default

    interval = max(num("interval_s"), 0.0)
    rtt = num("rtt_ms", -1.0)
    return {
        "run_id": run_id,
        "flow": str(flow),
        "stack": stack,
        "interval_start": float(now) - interval,
        "interval_end": float(now),
        "packets": int(num("packets")),
        "bytes": int(num("bytes")),
        "goodput": num("rate_bps"),
        "loss": min(max(num("loss"), 0.0), 1.0),
        "rtt": None if rtt < 0 else rtt,
    }


def create_run(engine: Engine, info: RunInfo) -> int:
    """Insert the ``runs`` row; returns its id. Raises ``db.DatabaseUnavailable``."""
    try:
        with engine.begin() as conn:
            res = conn.execute(insert(Run).values(
                started=time.time() if info.started is None else info.started,
                kind=info.kind, host=info.host, rules_version=info.rules_version,
                config=jsonable(info.config), source=info.source))
            pk = res.inserted_primary_key
            assert pk is not None
            return int(pk[0])
    except SQLAlchemyError as e:
        raise dbmod.DatabaseUnavailable(
            f"cannot write to {dbmod.safe_url(str(engine.url))}: "
            f"{getattr(e, 'orig', None) or e}") from None


def _unavailable(e: BaseException) -> bool:
    """Is this the database being unavailable (retry later) rather than a bad record?
    SQLAlchemy's wrappers, or the driver's own PEP 249 errors on the SQLite fast path."""
    if isinstance(e, OperationalError | InterfaceError | DisconnectionError | PoolTimeout
                  | OSError) or getattr(e, "connection_invalidated", False):
        return True
    return any(c.__name__ in ("OperationalError", "InterfaceError") for c in type(e).__mro__)


def _msg(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


_JSON_COLUMNS = {"events": frozenset({"fields"}), "decisions": frozenset({"facts"}),
                 "flows": frozenset({"features"})}

# Queue record kinds (first element of the tuple).
_EVENT, _DECISION, _OUTCOME, _FLOW = 0, 1, 2, 3


class LogWriter:
    """A ``DecisionSink`` that writes the decision log to ``url`` off the packet path.

    ``url``: SQLAlchemy URL or SQLite path (``None``: ``db.DEFAULT_URL``). ``run_info``:
    a ``RunInfo`` or a mapping of its fields. ``queue_max``: records held at most while the
    database lags; beyond it records are dropped and counted. ``batch``: records per
    transaction. ``block=True`` (offline tools such as replay only) makes a full queue wait
    instead of drop. ``migrate=False``: refuse an old schema instead of upgrading it.
    """

    def __init__(self, url: str | None, run_info: RunInfo | Mapping[str, Any] | None = None,
                 *, queue_max: int = 100_000, batch: int = 500, flush_interval: float = 0.2,
                 retry_max: float = 2.0, block: bool = False, migrate: bool = True) -> None:
        if queue_max < 1 or batch < 1:
            raise ValueError("queue_max and batch must be >= 1")
        info = run_info if isinstance(run_info, RunInfo) else RunInfo(**dict(run_info or {}))
        self.engine = dbmod.open_db(url, migrate=migrate)
        try:
            self.run_id = create_run(self.engine, info)
        except BaseException:
            self.engine.dispose()
            raise
        self.queue_max = queue_max
        self.batch = batch
        self.block = block
        self._flush_interval = flush_interval
        self._retry_max = retry_max
        self._q: deque[tuple[Any, ...]] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._pending: list[tuple[Any, ...]] = []  # the batch being written (retried on error)
        self._flows: dict[str, float] = {}  # flow key -> last_seen written (writer thread only)
        # Counters: ``dropped`` by the caller's side, the rest by the writer thread.
        self.dropped = 0
        self.written = 0
        self.errors = 0
        self.lost = 0  # still queued at close() while the database was down
        self.rejected = 0  # records the database refused (bad data), dropped
        self.last_error: str | None = None
        self.db_up = True
        self._closed = False
        self._last_event: Event | None = None
        self._last_decision: Decision | None = None
        self._sqlite = self.engine.dialect.name == "sqlite"
        self._thread = threading.Thread(target=self._run, name="vstack-log-writer", daemon=True)
        self._thread.start()

    # -- DecisionSink: the packet path. Append or count a drop; never block, never raise.
    def _put(self, item: tuple[Any, ...]) -> None:
        if self._closed:
            self.dropped += 1
            return
        if len(self._q) >= self.queue_max:
            if not self.block:
                self.dropped += 1
                return
            while len(self._q) >= self.queue_max and self._thread.is_alive():
                self._wake.set()
                time.sleep(0.005)
        self._q.append(item)
        if len(self._q) >= self.batch:
            self._wake.set()

    # The datapath and the engine may both hand the same object to the sink (the datapath
    # logs the flow.new event and the Decision that engine.decide, which logs them too,
    # took and returned): the same object twice in a row is logged once.
    def event(self, event: Event) -> None:
        if event is self._last_event:
            return
        self._last_event = event
        self._put((_EVENT, event))

    def decision(self, flow: FlowKey | None, decision: Decision, now: float) -> None:
        if decision is self._last_decision:
            return
        self._last_decision = decision
        self._put((_DECISION, flow, decision, now))

    def outcome(self, flow: FlowKey, stack: str, now: float, metrics: Mapping[str, Any]) -> None:
        self._put((_OUTCOME, flow, stack, now, dict(metrics)))

    def flow_seen(self, flow: FlowKey, features: Mapping[str, Any], now: float) -> None:
        self._put((_FLOW, flow, dict(features), now))

    # -- control
    @property
    def queued(self) -> int:
        return len(self._q) + len(self._pending)

    def stats(self) -> dict[str, Any]:
        """Counters for ``vstack flows`` and the metrics endpoint."""
        return {
            "run_id": self.run_id,
            "queued": self.queued,
            "queue_max": self.queue_max,
            "written": self.written,
            "dropped": self.dropped,
            "lost": self.lost,
            "rejected": self.rejected,
            "errors": self.errors,
            "db_up": self.db_up,
            "last_error": self.last_error,
        }

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait (off the packet path!) until everything queued is written; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.queued and time.monotonic() < deadline and self._thread.is_alive():
            self._wake.set()
            time.sleep(0.005)
        return self.queued == 0

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking records, write what is queued (up to ``timeout`` s), mark the run ended.
        Records that could not be written count as ``lost``."""
        if self._closed:
            return
        self.flush(timeout)
        self._closed = True
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)
        self.lost += len(self._q) + len(self._pending)
        self._q.clear()
        self._pending = []
        try:
            with self.engine.begin() as conn:
                conn.execute(update(Run).where(Run.id == self.run_id).values(ended=time.time()))
        except SQLAlchemyError as e:
            self.last_error = str(getattr(e, "orig", None) or e)
        self.engine.dispose()

    def __enter__(self) -> LogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the writer thread
    def _run(self) -> None:
        backoff = 0.0
        while True:
            if not self._pending:
                if len(self._q) < self.batch and not self._stop:
                    self._wake.wait(self._flush_interval)
                    self._wake.clear()
                n = min(len(self._q), self.batch)
                self._pending = [self._q.popleft() for _ in range(n)]
            if not self._pending:
                if self._stop:
                    return
                continue
            try:
                try:
                    self._write(self._pending)
                    self.written += len(self._pending)
                    self._pending = []
                except Exception as e:
                    if _unavailable(e):
                        raise
                    self._write_each()  # a bad record: find it, write the others
            except Exception as e:  # the database is down, locked or unreachable
                self.errors += 1
                self.db_up = False
                self.last_error = _msg(e)
                backoff = min(max(backoff * 2, 0.05), self._retry_max)
                if self._stop:
                    return
                self._wake.wait(backoff)
                self._wake.clear()
                continue
            self.db_up = True
            backoff = 0.0

    def _write_each(self) -> None:
        """Write the pending records one at a time; drop (and count) those the database
        refuses. Raises if the database becomes unavailable (the rest stay pending)."""
        while self._pending:
            item = self._pending[0]
            try:
                self._write([item])
                self.written += 1
            except Exception as e:
                if _unavailable(e):
                    raise
                self.rejected += 1
                self.errors += 1
                self.last_error = f"record refused: {_msg(e)}"
            self._pending.pop(0)

    def _write(self, items: list[tuple[Any, ...]]) -> None:
        run = self.run_id
        events: list[dict[str, Any]] = []
        decisions: list[dict[str, Any]] = []
        outcomes: list[dict[str, Any]] = []
        new_flows: dict[str, dict[str, Any]] = {}
        seen: dict[str, float] = {}
        for item in items:
            kind = item[0]
            if kind == _EVENT:
                ev: Event = item[1]
                events.append({"run_id": run, "type": ev.type, "time": float(ev.time),
                               "flow": None if ev.flow is None else str(ev.flow),
                               "fields": jsonable(ev.fields)})
            elif kind == _DECISION:
                decisions.append(decision_row(run, item[1], item[2], item[3]))
            elif kind == _OUTCOME:
                outcomes.append(outcome_row(run, item[1], item[2], item[3], item[4]))
            else:
                key, feats, now = str(item[1]), item[2], float(item[3])
                if key in self._flows or key in new_flows:
                    seen[key] = max(seen.get(key, now), now)
                else:
                    new_flows[key] = {"run_id": run, "key": key, "features": jsonable(feats),
                                      "first_seen": now, "last_seen": now}
        for key, row in new_flows.items():
            if key in seen:
                row["last_seen"] = max(row["last_seen"], seen.pop(key))
        if self._sqlite:
            self._write_sqlite(events, decisions, outcomes, list(new_flows.values()), seen)
        else:
            self._write_core(events, decisions, outcomes, list(new_flows.values()), seen)
        for key, row in new_flows.items():
            self._flows[key] = row["last_seen"]
        self._flows.update(seen)

    def _write_sqlite(self, events: list[dict[str, Any]], decisions: list[dict[str, Any]],
                      outcomes: list[dict[str, Any]], flows: list[dict[str, Any]],
                      seen: dict[str, float]) -> None:
        """The same rows through the driver's ``executemany`` (SQLite: 4-5x less CPU than
        SQLAlchemy's per-row parameter processing, which this thread would take from the
        packet path through the GIL). JSON columns are stored as SQLAlchemy's JSON type
        stores them (JSON text)."""
        with self.engine.begin() as conn:
            cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                for table, rows in (("events", events), ("decisions", decisions),
                                    ("outcomes", outcomes), ("flows", flows)):
                    if not rows:
                        continue
                    cols = list(rows[0])
                    js = _JSON_COLUMNS.get(table, frozenset())
                    names = ", ".join(f'"{c}"' for c in cols)
                    marks = ", ".join("?" * len(cols))
                    sql = f"INSERT INTO {table} ({names}) VALUES ({marks})"
                    cur.executemany(sql, [tuple(json.dumps(r[c]) if c in js else r[c]
                                                for c in cols) for r in rows])
                if seen:
                    cur.executemany("UPDATE flows SET last_seen = ? WHERE run_id = ? AND key = ?",
                                    [(t, self.run_id, k) for k, t in seen.items()])
            finally:
                cur.close()

    def _write_core(self, events: list[dict[str, Any]], decisions: list[dict[str, Any]],
                    outcomes: list[dict[str, Any]], flows_rows: list[dict[str, Any]],
                    seen: dict[str, float]) -> None:
        run = self.run_id
        with self.engine.begin() as conn:
            if events:
                conn.execute(insert(EventRow), events)
            if decisions:
                conn.execute(insert(DecisionRow), decisions)
            if outcomes:
                conn.execute(insert(Outcome), outcomes)
            if flows_rows:
                conn.execute(insert(Flow), flows_rows)
            if seen:
                flows = cast(Table, Flow.__table__)
                conn.execute(
                    update(flows)
                    .where(flows.c.run_id == bindparam("b_run"))
                    .where(flows.c.key == bindparam("b_key"))
                    .values(last_seen=bindparam("b_last")),
                    [{"b_run": run, "b_key": k, "b_last": t} for k, t in seen.items()])


def dumps(value: Any) -> str:
    """Compact JSON of ``jsonable(value)`` (used by the trace recorder too)."""
    return json.dumps(jsonable(value), separators=(",", ":"), sort_keys=True)


__all__ = ["LogWriter", "RunInfo", "create_run", "decision_row", "dumps", "format_target",
           "jsonable", "outcome_row"]
