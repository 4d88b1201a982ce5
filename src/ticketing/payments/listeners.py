"""Event handlers of the payments service: a thin adapter over service.py."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from ticketing.common.events import OrderCancelled, OrderCompleted, OrderCreated
from ticketing.common.messaging import Delivered, Listener
from ticketing.payments import service
from ticketing.payments.charges import Charges


def register(listener: Listener, charges: Charges) -> None:
    @listener.on_batch(OrderCreated)
    async def on_orders_created(
        session: AsyncSession, orders: list[Delivered[OrderCreated]]
    ) -> None:
        await service.orders_created(session, [order.event for order in orders])

    @listener.on(OrderCancelled)
    async def on_order_cancelled(session: AsyncSession, event: OrderCancelled) -> None:
        await service.order_cancelled(session, charges, event)

    @listener.on(OrderCompleted)
    async def on_order_completed(session: AsyncSession, event: OrderCompleted) -> None:
        await service.order_completed(session, event)
