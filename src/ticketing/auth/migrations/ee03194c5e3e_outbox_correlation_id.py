"""outbox correlation id

Revision ID: ee03194c5e3e
Revises: fcca30c0fdd8
Create Date: 2026-11-22 03:23:45.824574
"""

from __future__ import annotations

from collections.abc import Sequence

from ticketing.common.migration_steps import (
    add_outbox_correlation_id,
    drop_outbox_correlation_id,
)

revision: str = "ee03194c5e3e"
down_revision: str | None = "fcca30c0fdd8"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    add_outbox_correlation_id()


def downgrade() -> None:
    drop_outbox_correlation_id()
