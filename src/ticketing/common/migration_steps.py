"""Schema steps for the tables every service keeps (outbox, inbox, dead letters).

Each service's Alembic history calls these, so the common tables are written once. A step is
frozen once released: a later change to the common tables is a new step, added to every
service's history by a new revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from ticketing.common.db import UtcDateTime

_PENDING = sa.text("published_at IS NULL")


def _serial(name: str) -> sa.Column[int]:
    return sa.Column(name, sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True)


def create_common_tables() -> None:
    """Step 1: the outbox, the inbox and the dead letters."""
    op.create_table(
        "dead_letters",
        _serial("id"),
        sa.Column("consumer", sa.String(length=64), nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=True),
        sa.Column("subject", sa.String(length=255), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "inbox",
        sa.Column("consumer", sa.String(length=64), nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("handled_at", UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("consumer", "event_id"),
    )
    op.create_table(
        "outbox",
        _serial("seq"),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("created_at", UtcDateTime(timezone=True), nullable=False),
        sa.Column("published_at", UtcDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("event_id"),
    )
    op.create_index(
        "ix_outbox_pending",
        "outbox",
        ["seq"],
        unique=False,
        postgresql_where=_PENDING,
        sqlite_where=_PENDING,
    )


def drop_common_tables() -> None:
    op.drop_index("ix_outbox_pending", table_name="outbox")
    op.drop_table("outbox")
    op.drop_table("inbox")
    op.drop_table("dead_letters")


def add_outbox_correlation_id() -> None:
    """Step 2: the correlation id an outbox row carries into its NATS headers."""
    with op.batch_alter_table("outbox") as batch_op:
        batch_op.add_column(sa.Column("correlation_id", sa.String(length=64), nullable=True))


def drop_outbox_correlation_id() -> None:
    with op.batch_alter_table("outbox") as batch_op:
        batch_op.drop_column("correlation_id")
