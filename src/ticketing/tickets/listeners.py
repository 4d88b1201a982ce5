"""Event handlers of the tickets service: a thin adapter over service.py."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from ticketing.common.events import OrderCancelled, OrderCompleted, OrderCreated
from ticketing.common.messaging import Delivered, Listener
from ticketing.tickets import service


def register(listener: Listener) -> None:
    @listener.on_batch(OrderCreated)
    async def on_orders_created(
        session: AsyncSession, orders: list[Delivered[OrderCreated]]
    ) -> None:
        await service.reserve_all(session, orders)

    @listener.on(OrderCancelled)
    async def on_order_cancelled(session: AsyncSession, event: OrderCancelled) -> None:
        await service.release(session, ticket_id=event.ticket.id, order_id=event.id)

    @listener.on(OrderCompleted)
    async def on_order_completed(session: AsyncSession, event: OrderCompleted) -> None:
        await service.mark_sold(session, ticket_id=event.ticket.id, order_id=event.id)
