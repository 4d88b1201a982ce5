"""outbox correlation id

Revision ID: cc5ee8d86ee7
Revises: 7be565a0f27e
Create Date: 2026-11-22 03:23:48.932922
"""

from __future__ import annotations

from collections.abc import Sequence

from ticketing.common.migration_steps import (
    add_outbox_correlation_id,
    drop_outbox_correlation_id,
)

revision: str = "cc5ee8d86ee7"
down_revision: str | None = "7be565a0f27e"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    add_outbox_correlation_id()


def downgrade() -> None:
    drop_outbox_correlation_id()
