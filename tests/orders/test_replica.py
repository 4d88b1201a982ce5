"""The orders service's replica of tickets over the real bus: versions decide, not arrival."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest

from tests.conftest import Platform, new_user
from tests.orders.test_routes import seed_ticket
from tests.support import consumer_settled, eventually
from ticketing.common.events import Envelope, TicketCreated, TicketUpdated
from ticketing.common.messaging import RetryLater
from ticketing.orders import service
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


async def _apply_together(platform: Platform, *updates: Envelope) -> None:
    async with platform.runtime("orders").db.transaction() as session:
        await service.tickets_updated(session, [u.payload() for u in updates])  # type: ignore[misc]


async def test_updates_handled_together_apply_as_one_by_one(platform: Platform) -> None:
    """In stream order: two versions of one ticket in a row both apply; a stale one is
    dropped."""
    await platform.start("orders")
    seller = new_user()
    first, second = [await seed_ticket(platform, seller=seller) for _ in range(2)]
    await _apply_together(platform, update(first, seller, 1))
    await _apply_together(
        platform,
        update(first, seller, 1),  # stale by now
        update(second, seller, 1),
        update(first, seller, 2),
    )
    found = [await replica(platform, t) for t in (first, second)]
    assert [(r.version, r.title) for r in found if r is not None] == [
        (2, "Concert v2"),
        (1, "Concert v1"),
    ]


async def test_updates_handled_together_wait_as_a_whole_for_an_early_one(
    platform: Platform,
) -> None:
    await platform.start("orders")
    seller = new_user()
    first, second = [await seed_ticket(platform, seller=seller) for _ in range(2)]
    with pytest.raises(RetryLater):
        await _apply_together(platform, update(first, seller, 1), update(second, seller, 2))
    found = [await replica(platform, t) for t in (first, second)]
    assert [r.version for r in found if r is not None] == [0, 0]  # rolled back, both to retry
