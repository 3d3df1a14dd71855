"""The decision log's schema (SQLAlchemy 2 declarative).

One ``runs`` row per live run or replay; everything else hangs off a run. Flows are named
by their ``FlowKey`` text (``udp:10.0.0.1:5000->10.201.1.2:9000``) and are unique per run,
so events, decisions and outcomes refer to a flow by ``(run_id, flow)`` without a second
lookup on the write path. Times are seconds as floats: wall-clock epoch for a live run,
the trace's timestamps for a replay.

The tables are created by the Alembic migrations in ``db/migrations`` (never by
``metadata.create_all``), so that an older database can be told to upgrade.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Run(Base):
    """A live run (``kind="live"``) or a replay (``kind="replay"``)."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    started: Mapped[float] = mapped_column(Float, nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False, default="live")
    host: Mapped[str] = mapped_column(String(255), nullable=False, default="")
    rules_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    source: Mapped[str | None] = mapped_column(String(1024), nullable=True)  # trace, for replays
    ended: Mapped[float | None] = mapped_column(Float, nullable=True)


class Flow(Base):
    """A flow as the classifier saw it: its key and the features of its first packet."""

    __tablename__ = "flows"
    __table_args__ = (UniqueConstraint("run_id", "key", name="uq_flows_run_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), nullable=False)
    key: Mapped[str] = mapped_column(String(128), nullable=False)
    features: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    first_seen: Mapped[float] = mapped_column(Float, nullable=False)
    last_seen: Mapped[float] = mapped_column(Float, nullable=False)


class EventRow(Base):
    """An event that entered the decision engine (``vstack.decision.events.Event``)."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_run_time", "run_id", "time"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), nullable=False)
    type: Mapped[str] = mapped_column(String(64), nullable=False)
    time: Mapped[float] = mapped_column(Float, nullable=False)
    flow: Mapped[str | None] = mapped_column(String(128), nullable=True)
    fields: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)


class DecisionRow(Base):
    """One decision (``vstack.execution.selector.Decision``) and the facts it was made on."""

    __tablename__ = "decisions"
    __table_args__ = (Index("ix_decisions_run_flow", "run_id", "flow"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), nullable=False)
    time: Mapped[float] = mapped_column(Float, nullable=False)
    flow: Mapped[str | None] = mapped_column(String(128), nullable=True)
    rule: Mapped[str | None] = mapped_column(String(128), nullable=True)
    rules_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    facts: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    stack: Mapped[str | None] = mapped_column(String(32), nullable=True)
    interface: Mapped[str | None] = mapped_column(String(64), nullable=True)
    target: Mapped[str | None] = mapped_column(String(128), nullable=True)  # "addr" / "addr:port"
    dscp: Mapped[int | None] = mapped_column(Integer, nullable=True)
    drop: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    propensity: Mapped[float] = mapped_column(Float, nullable=False, default=1.0)
    explored: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)


class Outcome(Base):
    """What a flow measured over one interval on one stack (from ``flow.metrics``)."""

    __tablename__ = "outcomes"
    __table_args__ = (Index("ix_outcomes_run_flow", "run_id", "flow"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), nullable=False)
    flow: Mapped[str] = mapped_column(String(128), nullable=False)
    stack: Mapped[str] = mapped_column(String(32), nullable=False)
    interval_start: Mapped[float] = mapped_column(Float, nullable=False)
    interval_end: Mapped[float] = mapped_column(Float, nullable=False)
    packets: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    bytes: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    goodput: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)  # bit/s
    loss: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)  # 0..1
    rtt: Mapped[float | None] = mapped_column(Float, nullable=True)  # ms; None = not measured


__all__ = ["Base", "DecisionRow", "EventRow", "Flow", "Outcome", "Run"]
