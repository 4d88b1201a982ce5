"""the price an order was placed at, whether its hold was seen, a payment before it

Revision ID: e3a1c9d2b7f4
Revises: cc5ee8d86ee7
Create Date: 2026-12-01 20:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "e3a1c9d2b7f4"
down_revision: str | None = "cc5ee8d86ee7"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable: orders placed before this revision have neither (nothing is checked for them).
    op.add_column("orders", sa.Column("price", sa.Numeric(precision=12, scale=2), nullable=True))
    op.add_column("orders", sa.Column("held", sa.Boolean(), nullable=True))
    op.add_column("orders", sa.Column("paid", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("orders") as batch:
        batch.drop_column("paid")
        batch.drop_column("held")
        batch.drop_column("price")
