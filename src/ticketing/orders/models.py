"""The orders service's tables: orders, and its replica of the tickets it may sell."""

from __future__ import annotations

import enum
from datetime import datetime
from decimal import Decimal

from sqlalchemy import Enum, ForeignKey, Index, Numeric, String, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from ticketing.common.db import UtcDateTime, next_version, utcnow
from ticketing.common.ids import new_id


class OrdersBase(DeclarativeBase):
    pass


class OrderStatus(enum.StrEnum):
    CREATED = "created"
    CANCELLED = "cancelled"
    COMPLETE = "complete"


def _values(enum_class: type[OrderStatus]) -> list[str]:
    return [member.value for member in enum_class]


class TicketReplica(OrdersBase):
    """What orders knows of a ticket, kept in step by ticket:created / ticket:updated."""

    __tablename__ = "tickets"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    price: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    user_id: Mapped[str] = mapped_column(String(36))
    # Set from the events, never incremented here: it mirrors the tickets service's version.
    version: Mapped[int] = mapped_column()


class Order(OrdersBase):
    __tablename__ = "orders"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(String(36), index=True)
    ticket_id: Mapped[str] = mapped_column(ForeignKey("tickets.id"))
    status: Mapped[OrderStatus] = mapped_column(
        Enum(
            OrderStatus,
            native_enum=False,
            length=16,
            values_callable=lambda e: [m.value for m in e],
        )
    )
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    version: Mapped[int] = mapped_column()
    # The ticket's price as the buyer was told it (and as payments charges it, from
    # order:created); none for orders placed before it was kept.
    price: Mapped[Decimal | None] = mapped_column(Numeric(12, 2), nullable=True)
    # Whether the tickets service's hold of the ticket for this order, at that price, has been
    # seen here: a payment completes the order only then. None for orders from before.
    held: Mapped[bool | None] = mapped_column(nullable=True)
    # A payment that came before the hold: the order completes as the hold is seen.
    paid: Mapped[bool | None] = mapped_column(nullable=True)

    ticket: Mapped[TicketReplica] = relationship(lazy="joined")

    __mapper_args__ = {"version_id_col": version, "version_id_generator": next_version}
    __table_args__ = (
        # No double booking, whatever the concurrency: one order that is not cancelled per
        # ticket, enforced by the database itself.
        Index(
            "uq_orders_one_active_per_ticket",
            "ticket_id",
            unique=True,
            postgresql_where=text("status <> 'cancelled'"),
            sqlite_where=text("status <> 'cancelled'"),
        ),
        Index("ix_orders_user_created", "user_id", "created_at"),
    )
