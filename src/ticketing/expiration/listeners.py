"""Event handlers of the expiration service: a thin adapter over service.py."""

from __future__ import annotations

from ticketing.common.events import OrderCreated
from ticketing.common.messaging import Delivered, Listener
from ticketing.expiration import service
from ticketing.expiration.jobs import JobQueue


def register(listener: Listener, queue: JobQueue) -> None:
    # Idempotent without an inbox entry in this service's database: the queue drops a second
    # job for an order (one job id per order), and a job that runs twice announces the
    # expiry once (one event id per order).
    @listener.on_batch_outside_db(OrderCreated)
    async def on_orders_created(orders: list[Delivered[OrderCreated]]) -> None:
        await service.schedule_all(queue, events=[order.event for order in orders])
