"""outbox correlation id

Revision ID: 1c16f42da4d6
Revises: ca54f8eec4b9
Create Date: 2026-11-22 03:23:51.845494
"""

from __future__ import annotations

from collections.abc import Sequence

from ticketing.common.migration_steps import (
    add_outbox_correlation_id,
    drop_outbox_correlation_id,
)

revision: str = "1c16f42da4d6"
down_revision: str | None = "ca54f8eec4b9"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    add_outbox_correlation_id()


def downgrade() -> None:
    drop_outbox_correlation_id()
