"""The decision-log schema: migrations, round trips, schema checks, unreachable URLs."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.orm import Session

import db
from db.models import DecisionRow, EventRow, Flow, Outcome, Run


def test_open_creates_file_directory_and_schema_in_wal(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "decisions.sqlite"
    engine = db.open_db(str(path))
    assert path.exists()
    assert db.table_names(engine) == ["alembic_version", "decisions", "events", "flows",
                                      "outcomes", "runs"]
    assert db.schema_revision(engine) == db.head_revision()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()


def test_url_and_path_forms(tmp_path: Path) -> None:
    assert db.to_url(None) == db.DEFAULT_URL == "sqlite:////var/lib/vstack/decisions.sqlite"
    assert db.to_url(str(tmp_path / "a.sqlite")) == f"sqlite:///{tmp_path}/a.sqlite"
    assert db.to_url("postgresql://u@h/x") == "postgresql://u@h/x"
    engine = db.open_db(f"sqlite:///{tmp_path}/b.sqlite")
    assert "runs" in db.table_names(engine)
    engine.dispose()


def test_round_trip_all_tables(tmp_path: Path) -> None:
    engine = db.open_db(tmp_path / "rt.sqlite")
    with Session(engine) as s:
        run = Run(started=1.5, kind="live", host="edge", rules_version="abc",
                  config={"nat": {"10.201.1.2:9000": {"udp": "10.0.0.2:9000"}}})
        s.add(run)
        s.flush()
        s.add_all([
            Flow(run_id=run.id, key="udp:10.0.0.1:5000->10.201.1.2:9000",
                 features={"dport": 9000, "proto": "udp"}, first_seen=1.0, last_seen=9.0),
            EventRow(run_id=run.id, type="link.down", time=2.0, flow=None,
                     fields={"ifname": "eth1", "index": 3}),
            DecisionRow(run_id=run.id, time=1.0, flow="udp:10.0.0.1:5000->10.201.1.2:9000",
                        rule="bulk", rules_version="abc", facts={"payload_len": 1200},
                        stack="dccp", interface="eth1", target="10.0.0.2:9000", dscp=None,
                        drop=False, propensity=0.25, explored=True),
            Outcome(run_id=run.id, flow="udp:10.0.0.1:5000->10.201.1.2:9000", stack="dccp",
                    interval_start=1.0, interval_end=2.0, packets=10, bytes=12000,
                    goodput=96000.0, loss=0.01, rtt=12.5),
        ])
        s.commit()
        rid = run.id
    engine.dispose()
    engine = db.open_db(tmp_path / "rt.sqlite", create=False, migrate=False)
    with Session(engine) as s:
        r = s.get(Run, rid)
        assert r is not None and r.config["nat"]["10.201.1.2:9000"]["udp"] == "10.0.0.2:9000"
        f = s.scalars(select(Flow)).one()
        assert (f.features, f.first_seen, f.last_seen) == ({"dport": 9000, "proto": "udp"}, 1.0,
                                                           9.0)
        e = s.scalars(select(EventRow)).one()
        assert (e.type, e.fields, e.flow) == ("link.down", {"ifname": "eth1", "index": 3}, None)
        d = s.scalars(select(DecisionRow)).one()
        assert (d.stack, d.rule, d.propensity, d.explored, d.facts) == (
            "dccp", "bulk", 0.25, True, {"payload_len": 1200})
        o = s.scalars(select(Outcome)).one()
        assert (o.goodput, o.loss, o.rtt, o.packets) == (96000.0, 0.01, 12.5, 10)
    engine.dispose()


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                              max_size=4),
    max_leaves=10)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(facts=st.dictionaries(st.text(min_size=1, max_size=10), _json, max_size=6),
       prop=st.floats(0.001, 1.0), explored=st.booleans(), stack=st.sampled_from(
           ["udp", "tcp", "dccp", "udplite", None]))
def test_decision_json_round_trip(tmp_path_factory: pytest.TempPathFactory, facts: dict,
                                  prop: float, explored: bool, stack: str | None) -> None:
    engine = db.open_db(tmp_path_factory.mktemp("h") / "h.sqlite")
    with Session(engine) as s:
        run = Run(started=0.0, kind="replay", host="", config={})
        s.add(run)
        s.flush()
        s.add(DecisionRow(run_id=run.id, time=0.5, flow=None, facts=facts, stack=stack,
                          propensity=prop, explored=explored, drop=False))
        s.commit()
    with Session(engine) as s:
        d = s.scalars(select(DecisionRow)).one()
        assert d.facts == facts
        assert (d.stack, d.propensity, d.explored) == (stack, prop, explored)
    engine.dispose()


def test_old_schema_gets_clear_message_and_upgrade_fixes_it(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    engine = db.open_db(path)
    engine.dispose()
    # Take the database back to before the first revision (what an older vstack left).
    from alembic import command

    engine = db.make_engine(path)
    cfg = db._alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
    assert db.schema_revision(engine) is None
    engine.dispose()
    with pytest.raises(db.SchemaOutdated) as exc:
        db.open_db(path, migrate=False)
    assert str(exc.value) == "database schema is older than this vstack: run `vstack db upgrade`"
    engine = db.make_engine(path)
    before, after = db.upgrade(engine)
    assert (before, after) == (None, db.head_revision())
    engine.dispose()
    db.open_db(path, migrate=False).dispose()  # now fine


def test_empty_database_without_migrate_is_outdated(tmp_path: Path) -> None:
    sqlite3.connect(tmp_path / "empty.sqlite").close()
    with pytest.raises(db.SchemaOutdated, match="vstack db upgrade"):
        db.open_db(tmp_path / "empty.sqlite", migrate=False)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite"
    db.open_db(path).dispose()
    con = sqlite3.connect(path)
    con.execute("UPDATE alembic_version SET version_num = '9999_future'")
    con.commit()
    con.close()
    with pytest.raises(db.SchemaTooNew, match="newer than this vstack"):
        db.open_db(path)


def test_unreachable_urls_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(db.DatabaseUnavailable, match="does not exist"):
        db.open_db(tmp_path / "missing.sqlite", create=False)
    with pytest.raises(db.DatabaseUnavailable, match="cannot create the database directory"):
        db.open_db("/proc/vstack-no/decisions.sqlite")
    with pytest.raises(db.DatabaseUnavailable, match="not a database URL"):
        db.open_db("foo bar://x")
    with pytest.raises(db.DatabaseUnavailable, match="cannot open bogus://"):
        db.open_db("bogus://x")
    with pytest.raises(db.DatabaseUnavailable) as exc:
        db.open_db("postgresql://vstack:secret@127.0.0.1:1/vstack")
    assert "secret" not in str(exc.value)  # the password is masked
    (tmp_path / "garbage.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(db.DatabaseUnavailable):
        db.open_db(tmp_path / "garbage.sqlite")
