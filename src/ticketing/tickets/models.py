"""The tickets service's tables."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import Boolean, Index, Numeric, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ticketing.common.db import UtcDateTime, next_version, utcnow
from ticketing.common.ids import new_id


class TicketsBase(DeclarativeBase):
    pass


class Ticket(TicketsBase):
    __tablename__ = "tickets"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    title: Mapped[str] = mapped_column(String(200))
    price: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    user_id: Mapped[str] = mapped_column(String(36))
    # The order holding the ticket (reserved), or that bought it (sold is true).
    order_id: Mapped[str | None] = mapped_column(String(36), default=None)
    sold: Mapped[bool] = mapped_column(Boolean, default=False)
    version: Mapped[int] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)

    __mapper_args__ = {"version_id_col": version, "version_id_generator": next_version}
    __table_args__ = (Index("ix_tickets_available", "order_id", "sold", "created_at"),)

    @property
    def reserved(self) -> bool:
        return self.order_id is not None and not self.sold


class ReleasedOrder(TicketsBase):
    """An order already cancelled: if its order:created shows up late, it reserves nothing."""

    __tablename__ = "released_orders"

    order_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    released_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
