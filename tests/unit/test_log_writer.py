"""LogWriter: nothing lost while the database is up; bounded memory and counted drops while it
is down (locked by another connection); clear error at start when it is unreachable."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

import db
from vstack.analysis.flowkey import FlowKey
from vstack.decision.events import Event
from vstack.execution.selector import Decision
from vstack.log import DecisionSink
from vstack.log.recorder import TraceRecorder
from vstack.log.writer import LogWriter, RunInfo

pytestmark = pytest.mark.timeout(120)


def _count(path: Path, table: str) -> int:
    con = sqlite3.connect(path)
    try:
        return int(con.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        con.close()


def _key(i: int) -> FlowKey:
    return FlowKey(17, "10.0.0.1", 1024 + i % 50_000, "10.201.1.2", 9000)


def _wait(cond, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return bool(cond())


def test_writer_is_a_decision_sink(tmp_path: Path) -> None:
    w: DecisionSink = LogWriter(str(tmp_path / "s.sqlite"), RunInfo(rules_version="v1"))
    w.close()


def test_under_load_nothing_is_lost(tmp_path: Path) -> None:
    path = tmp_path / "load.sqlite"
    w = LogWriter(str(path), {"config": {"stack": "udp"}, "rules_version": "abc", "host": "h"},
                  batch=500)
    n = 4000
    for i in range(n):
        k = _key(i)
        w.flow_seen(k, {"dport": 9000, "payload_len": i}, float(i))
        w.event(Event("flow.new", float(i), {"dport": 9000}, k))
        w.decision(k, Decision(stack="udp" if i % 2 else "tcp", rule="r", rules_version="abc",
                               facts={"payload_len": i}, propensity=0.5, explored=bool(i % 3)),
                   float(i))
        w.outcome(k, "udp", float(i) + 1, {"packets": 10, "bytes": 1000, "rate_bps": 8e3,
                                            "loss": 0.0, "rtt_ms": -1, "interval_s": 1.0})
        w.flow_seen(k, {}, float(i) + 5)  # last_seen update
    w.close()
    assert w.dropped == 0 and w.lost == 0
    assert w.written == 5 * n
    assert w.stats()["written"] == 5 * n
    assert _count(path, "events") == n
    assert _count(path, "decisions") == n
    assert _count(path, "outcomes") == n
    assert _count(path, "flows") == n
    con = sqlite3.connect(path)
    first, last, feats = con.execute(
        "SELECT first_seen, last_seen, features FROM flows WHERE key = ?",
        (str(_key(7)),)).fetchone()
    assert (first, last, json.loads(feats)) == (7.0, 12.0, {"dport": 9000, "payload_len": 7})
    run = con.execute("SELECT rules_version, host, config, ended FROM runs").fetchone()
    assert run[:3] == ("abc", "h", '{"stack": "udp"}') and run[3] is not None
    rows = con.execute("SELECT stack, propensity, explored FROM decisions ORDER BY id "
                       "LIMIT 3").fetchall()
    assert rows == [("tcp", 0.5, 0), ("udp", 0.5, 1), ("tcp", 0.5, 1)]
    con.close()


def test_database_down_bounds_the_queue_and_counts_drops(tmp_path: Path) -> None:
    path = tmp_path / "locked.sqlite"
    w = LogWriter(f"sqlite:///{path}?timeout=0.05", None, queue_max=1000, batch=100,
                  retry_max=0.1)
    # Another process takes the write lock: every insert of the writer fails ("locked").
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        total = 20_000
        for i in range(total):  # would hang here (and time out) if enqueue blocked
            w.event(Event("flow.metrics", float(i), {"packets": i}, _key(i)))
            assert w.queued <= w.queue_max + w.batch
        assert _wait(lambda: w.errors > 0)
        assert w.queued <= w.queue_max + w.batch
        assert w.dropped >= total - w.queue_max - w.batch
        assert w.stats()["dropped"] == w.dropped and w.stats()["db_up"] is False
        assert "locked" in (w.stats()["last_error"] or "")
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    # The database is back: what was queued gets written, nothing more is lost.
    assert w.flush(60.0)
    kept = total - w.dropped
    w.close()
    assert w.lost == 0
    assert _count(path, "events") == kept
    assert w.written == kept and w.db_up


def test_unreachable_database_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(db.DatabaseUnavailable, match=r"cannot open|cannot reach"):
        LogWriter("postgresql://vstack:pw@127.0.0.1:1/vstack", None)
    with pytest.raises(db.DatabaseUnavailable, match="cannot create the database directory"):
        LogWriter("/proc/vstack-no/x.sqlite", None)


def test_old_schema_refused_without_migrate(tmp_path: Path) -> None:
    sqlite3.connect(tmp_path / "old.sqlite").close()
    with pytest.raises(db.SchemaOutdated, match="run `vstack db upgrade`"):
        LogWriter(str(tmp_path / "old.sqlite"), None, migrate=False)


def test_records_after_close_are_counted_not_raised(tmp_path: Path) -> None:
    w = LogWriter(str(tmp_path / "c.sqlite"), None)
    w.close()
    w.event(Event("link.up", 1.0, {"ifname": "eth0", "index": 2}))
    assert w.dropped == 1


def test_trace_recorder_format(tmp_path: Path) -> None:
    from vstack.analysis.classifier import Direction
    from vstack.analysis.packet import build_udp

    pkt = build_udp("10.0.0.1", "10.201.1.2", 5000, 9000, b"x" * 1000)
    with TraceRecorder(tmp_path / "t.jsonl", meta={"rules": "a.rules"}) as rec:
        rec.packet(pkt, 100.25, Direction.APP_TO_NET)
        rec.packet(pkt, 100.5, "net->app")
        rec.event(Event("flow.metrics", 101.0, {"loss": 0.5}, _key(1)))
        assert rec.stats()["packets"] == 2
    lines = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert lines[0]["kind"] == "header" and lines[0]["format"] == "vstack-trace"
    assert lines[0]["meta"] == {"rules": "a.rules"}
    assert lines[1]["kind"] == "packet" and lines[1]["dir"] == "app->net"
    assert lines[1]["len"] == len(pkt) and lines[1]["t"] == 100.25
    import base64

    assert base64.b64decode(lines[1]["data"]) == pkt[:128]
    assert lines[2]["dir"] == "net->app"
    assert lines[3] == {"kind": "event", "t": 101.0, "type": "flow.metrics",
                        "flow": str(_key(1)), "fields": {"loss": 0.5}}
    with pytest.raises(ValueError, match="direction"):
        TraceRecorder(tmp_path / "u.jsonl").packet(pkt, 1.0, "sideways")


def test_a_record_the_database_refuses_is_dropped_alone(tmp_path: Path) -> None:
    path = tmp_path / "bad.sqlite"
    w = LogWriter(str(path), None)
    k = _key(1)
    w.decision(k, Decision(stack="udp"), 1.0)
    w.decision(k, Decision(stack="tcp", target=("10.0.0.1",)), 2.0)  # type: ignore[arg-type]
    w.decision(k, Decision(stack="dccp"), 3.0)
    w.close()
    assert (w.written, w.rejected, w.dropped, w.lost) == (2, 1, 0, 0)
    assert "record refused" in (w.stats()["last_error"] or "")
    con = sqlite3.connect(path)
    assert [r[0] for r in con.execute("SELECT stack FROM decisions ORDER BY time")] == \
        ["udp", "dccp"]
    con.close()


def test_same_object_from_datapath_and_engine_logged_once(tmp_path: Path) -> None:
    """The datapath logs the flow.new event and the decision the engine also logs."""
    from vstack.decision.engine import DecisionEngine
    from vstack.decision.parser import parse_rules

    path = tmp_path / "dup.sqlite"
    w = LogWriter(str(path), None)
    eng = DecisionEngine(parse_rules("rule r: on flow.new then use_stack(udp)\n"), None, w,
                         backend="reference")
    k = _key(3)
    for i in range(2):
        ev = Event("flow.new", float(i), {"dport": 9000}, k)
        w.event(ev)  # datapath
        d = eng.decide(ev, float(i))  # engine: logs ev and d
        w.decision(k, d, float(i))  # datapath again
    w.close()
    assert _count(path, "events") == 2 and _count(path, "decisions") == 2


def test_core_path_writes_the_same_rows(tmp_path: Path) -> None:
    """The SQLAlchemy Core path (used for PostgreSQL and other databases) and the SQLite
    fast path store the same rows."""
    rows = {}
    for fast in (True, False):
        path = tmp_path / f"p{fast}.sqlite"
        w = LogWriter(str(path), None)
        w._sqlite = fast
        k = _key(5)
        w.flow_seen(k, {"dport": 9000, "proto": "udp"}, 1.0)
        w.event(Event("flow.new", 1.0, {"dport": 9000, "x": [1, 2.5, None]}, k))
        w.decision(k, Decision(stack="udp", rule="r", facts={"a": {"b": 1}},
                               target=("fd00::1", 9), propensity=0.3, explored=True), 1.0)
        w.outcome(k, "udp", 2.0, {"packets": 3, "bytes": 300, "rate_bps": 2400.0,
                                  "loss": 0.5, "rtt_ms": 4.0, "interval_s": 1.0})
        w.flow_seen(k, {}, 7.0)
        w.close()
        assert w.written == 5 and w.rejected == 0
        con = sqlite3.connect(path)
        rows[fast] = {t: [tuple(_json_or(v) for v in r[2:])
                          for r in con.execute(f"SELECT * FROM {t}")]
                      for t in ("flows", "events", "decisions", "outcomes")}
        con.close()
    assert rows[True] == rows[False]
    assert rows[True]["decisions"][0][7] == "[fd00::1]:9"  # time, flow, rule, ..., target


def _json_or(v: object) -> object:
    if isinstance(v, str):
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v
