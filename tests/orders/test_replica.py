"""The orders service's replica of tickets over the real bus: versions decide, not arrival."""

from __future__ import annotations

import uuid
from decimal import Decimal

from tests.conftest import Platform, new_user
from tests.support import consumer_settled, eventually
from ticketing.common.events import Envelope, TicketCreated, TicketUpdated
from ticketing.orders.models import TicketReplica


async def replica(platform: Platform, ticket_id: str) -> TicketReplica | None:
    async with platform.runtime("orders").db.transaction() as session:
        return await session.get(TicketReplica, ticket_id)


def update(ticket_id: str, seller: str, version: int, *, order_id: str | None = None) -> Envelope:
    return Envelope.wrap(
        TicketUpdated(
            id=ticket_id,
            version=version,
            title=f"Concert v{version}",
            price=Decimal(10 + version),
            user_id=seller,
            order_id=order_id,
        )
    )


async def test_updates_apply_in_version_order_whatever_the_arrival_order(
    platform: Platform,
) -> None:
    await platform.start("orders")
    publisher = platform.runtime("orders").publisher
    ticket_id, seller = str(uuid.uuid4()), new_user()
    created = TicketCreated(
        id=ticket_id, version=0, title="Concert", price=Decimal(10), user_id=seller
    )
    # v2 arrives before v1, and both arrive twice (distinct deliveries of the same versions);
    # the creation itself comes last of all.
    for envelope in (
        update(ticket_id, seller, 2),
        update(ticket_id, seller, 2),
        update(ticket_id, seller, 1),
        update(ticket_id, seller, 1),
        Envelope.wrap(created),
    ):
        await publisher.publish(envelope)

    async def at_v2() -> TicketReplica | None:
        found = await replica(platform, ticket_id)
        return found if found is not None and found.version == 2 else None

    final = await eventually(at_v2)
    assert final.title == "Concert v2"
    assert final.price == Decimal(12)
    await eventually(lambda: consumer_settled(platform.runtime("orders").bus, "orders"))
    after = await replica(platform, ticket_id)
    assert after is not None and after.version == 2  # the stale v1 copies were dropped


async def test_a_stale_update_is_acked_and_dropped(platform: Platform) -> None:
    await platform.start("orders")
    runtime = platform.runtime("orders")
    ticket_id, seller = str(uuid.uuid4()), new_user()
    await runtime.publisher.publish(
        Envelope.wrap(
            TicketCreated(id=ticket_id, version=0, title="A", price=Decimal(5), user_id=seller)
        )
    )
    await runtime.publisher.publish(update(ticket_id, seller, 1))
    await runtime.publisher.publish(update(ticket_id, seller, 2))
    await eventually(lambda: consumer_settled(runtime.bus, "orders"))
    await runtime.publisher.publish(update(ticket_id, seller, 1))  # a late copy of v1
    await eventually(lambda: consumer_settled(runtime.bus, "orders"))
    found = await replica(platform, ticket_id)
    assert found is not None
    assert (found.version, found.title) == (2, "Concert v2")
