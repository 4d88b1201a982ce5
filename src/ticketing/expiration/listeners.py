"""Event handlers of the expiration service: a thin adapter over service.py."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from ticketing.common.events import OrderCreated
from ticketing.common.messaging import Listener
from ticketing.expiration import service
from ticketing.expiration.jobs import JobQueue


def register(listener: Listener, queue: JobQueue) -> None:
    @listener.on(OrderCreated)
    async def on_order_created(session: AsyncSession, event: OrderCreated) -> None:
        await service.schedule(queue.pool, queue=queue.name, event=event)
