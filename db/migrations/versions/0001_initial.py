"""Initial decision-log schema: runs, flows, events, decisions, outcomes.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-28

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("started", sa.Float(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("rules_version", sa.String(64), nullable=True),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("source", sa.String(1024), nullable=True),
        sa.Column("ended", sa.Float(), nullable=True),
    )
    op.create_table(
        "flows",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("key", sa.String(128), nullable=False),
        sa.Column("features", sa.JSON(), nullable=False),
        sa.Column("first_seen", sa.Float(), nullable=False),
        sa.Column("last_seen", sa.Float(), nullable=False),
        sa.UniqueConstraint("run_id", "key", name="uq_flows_run_key"),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("time", sa.Float(), nullable=False),
        sa.Column("flow", sa.String(128), nullable=True),
        sa.Column("fields", sa.JSON(), nullable=False),
    )
    op.create_index("ix_events_run_time", "events", ["run_id", "time"])
    op.create_table(
        "decisions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("time", sa.Float(), nullable=False),
        sa.Column("flow", sa.String(128), nullable=True),
        sa.Column("rule", sa.String(128), nullable=True),
        sa.Column("rules_version", sa.String(64), nullable=True),
        sa.Column("facts", sa.JSON(), nullable=False),
        sa.Column("stack", sa.String(32), nullable=True),
        sa.Column("interface", sa.String(64), nullable=True),
        sa.Column("target", sa.String(128), nullable=True),
        sa.Column("dscp", sa.Integer(), nullable=True),
        sa.Column("drop", sa.Boolean(), nullable=False),
        sa.Column("propensity", sa.Float(), nullable=False),
        sa.Column("explored", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_decisions_run_flow", "decisions", ["run_id", "flow"])
    op.create_table(
        "outcomes",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("flow", sa.String(128), nullable=False),
        sa.Column("stack", sa.String(32), nullable=False),
        sa.Column("interval_start", sa.Float(), nullable=False),
        sa.Column("interval_end", sa.Float(), nullable=False),
        sa.Column("packets", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("goodput", sa.Float(), nullable=False),
        sa.Column("loss", sa.Float(), nullable=False),
        sa.Column("rtt", sa.Float(), nullable=True),
    )
    op.create_index("ix_outcomes_run_flow", "outcomes", ["run_id", "flow"])


def downgrade() -> None:
    op.drop_index("ix_outcomes_run_flow", table_name="outcomes")
    op.drop_table("outcomes")
    op.drop_index("ix_decisions_run_flow", table_name="decisions")
    op.drop_table("decisions")
    op.drop_index("ix_events_run_time", table_name="events")
    op.drop_table("events")
    op.drop_table("flows")
    op.drop_table("runs")
