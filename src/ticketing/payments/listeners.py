"""Event handlers of the payments service: a thin adapter over service.py."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from ticketing.common.events import OrderCancelled, OrderCompleted, OrderCreated
from ticketing.common.messaging import Listener
from ticketing.payments import service
from ticketing.payments.charges import Charges


def register(listener: Listener, charges: Charges) -> None:
    @listener.on(OrderCreated)
    async def on_order_created(session: AsyncSession, event: OrderCreated) -> None:
        await service.order_created(session, event)

    @listener.on(OrderCancelled)
    async def on_order_cancelled(session: AsyncSession, event: OrderCancelled) -> None:
        await service.order_cancelled(session, charges, event)

    @listener.on(OrderCompleted)
    async def on_order_completed(session: AsyncSession, event: OrderCompleted) -> None:
        await service.order_completed(session, event)
