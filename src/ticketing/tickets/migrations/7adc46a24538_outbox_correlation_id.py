"""outbox correlation id

Revision ID: 7adc46a24538
Revises: 38c5d985a4f4
Create Date: 2026-11-22 03:23:47.307200
"""

from __future__ import annotations

from collections.abc import Sequence

from ticketing.common.migration_steps import (
    add_outbox_correlation_id,
    drop_outbox_correlation_id,
)

revision: str = "7adc46a24538"
down_revision: str | None = "38c5d985a4f4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    add_outbox_correlation_id()


def downgrade() -> None:
    drop_outbox_correlation_id()
