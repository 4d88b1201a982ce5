"""Event handlers of the orders service: a thin adapter over service.py."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from ticketing.common.events import (
    ExpirationComplete,
    PaymentCreated,
    TicketCreated,
    TicketUpdated,
)
from ticketing.common.messaging import Delivered, Listener
from ticketing.orders import service


def register(listener: Listener) -> None:
    @listener.on(TicketCreated)
    async def on_ticket_created(session: AsyncSession, event: TicketCreated) -> None:
        await service.ticket_created(session, event)

    @listener.on_batch(TicketUpdated)
    async def on_tickets_updated(
        session: AsyncSession, updates: list[Delivered[TicketUpdated]]
    ) -> None:
        await service.tickets_updated(session, [update.event for update in updates])

    @listener.on(ExpirationComplete)
    async def on_expiration_complete(session: AsyncSession, event: ExpirationComplete) -> None:
        await service.expire(session, order_id=event.order_id)

    @listener.on(PaymentCreated)
    async def on_payment_created(session: AsyncSession, event: PaymentCreated) -> None:
        await service.complete(session, order_id=event.order_id)
