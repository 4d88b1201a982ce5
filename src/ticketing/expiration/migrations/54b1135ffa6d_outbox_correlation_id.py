"""outbox correlation id

Revision ID: 54b1135ffa6d
Revises: dd9283fd340b
Create Date: 2026-11-22 03:23:50.364010
"""

from __future__ import annotations

from collections.abc import Sequence

from ticketing.common.migration_steps import (
    add_outbox_correlation_id,
    drop_outbox_correlation_id,
)

revision: str = "54b1135ffa6d"
down_revision: str | None = "dd9283fd340b"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    add_outbox_correlation_id()


def downgrade() -> None:
    drop_outbox_correlation_id()
