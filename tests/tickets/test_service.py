"""The tickets service's event handling when two processes handle one order's events at once."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from sqlalchemy import text

from tests.conftest import Platform, new_user
from tests.support import eventually
from tests.tickets.test_routes import create
from ticketing.common.db import Database
from ticketing.common.messaging import RetryLater
from ticketing.tickets import service
from ticketing.tickets.models import Ticket


async def _waiting_on_a_lock(db: Database) -> bool:
    async with db.transaction() as session:
        waiting = await session.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()"
            )
        )
    return bool(waiting)


async def test_a_cancellation_and_its_creation_handled_at_once_leave_the_ticket_free(
    platform: Platform,
) -> None:
    """order:cancelled is being handled (not committed yet) when another process handles the
    same order's order:created: that one waits for the ticket, then sees the cancellation."""
    await platform.start("tickets")
    db = platform.runtime("tickets").db
    if db.is_sqlite:
        pytest.skip("SQLite runs one writing transaction at a time: no two handlers overlap")
    async with platform.client(new_user()) as seller:
        ticket_id = (await create(seller))["id"]
    order_id = str(uuid.uuid4())
    released, commit = asyncio.Event(), asyncio.Event()

    async def cancellation() -> None:
        async with db.transaction() as session:
            await service.release(session, ticket_id=ticket_id, order_id=order_id)
            released.set()
            await commit.wait()

    async def creation() -> None:
        async with db.transaction() as session:
            await service.reserve(session, ticket_id=ticket_id, order_id=order_id)

    first = asyncio.create_task(cancellation())
    await released.wait()
    second = asyncio.create_task(creation())
    # The creation has either finished (it did not wait: the bug) or waits on the ticket's lock.
    await eventually(lambda: second.done() or _waiting_on_a_lock(db))
    commit.set()
    await asyncio.gather(first, second)
    async with db.transaction() as session:
        ticket = await session.get(Ticket, ticket_id)
    assert ticket is not None
    assert ticket.order_id is None


async def _ticket(db: Database, ticket_id: str) -> Ticket:
    async with db.transaction() as session:
        ticket = await session.get(Ticket, ticket_id)
    assert ticket is not None
    return ticket


async def _on_sale(platform: Platform) -> tuple[Database, str]:
    """The tickets service's database, and a ticket just put on sale."""
    await platform.start("tickets")
    async with platform.client(new_user()) as seller:
        ticket_id = (await create(seller))["id"]
    return platform.runtime("tickets").db, ticket_id


async def _handle(db: Database, use_case: Any, ticket_id: str, order_id: str) -> None:
    async with db.transaction() as session:
        await use_case(session, ticket_id=ticket_id, order_id=order_id)


async def test_an_order_cancelled_before_its_creation_came_reserves_nothing(
    platform: Platform,
) -> None:
    db, ticket_id = await _on_sale(platform)
    order_id = str(uuid.uuid4())
    await _handle(db, service.release, ticket_id, order_id)
    await _handle(db, service.reserve, ticket_id, order_id)
    ticket = await _ticket(db, ticket_id)
    assert (ticket.order_id, ticket.version) == (None, 0)


async def test_a_ticket_held_by_another_order_waits_for_its_release_unless_this_one_is_gone(
    platform: Platform,
) -> None:
    db, ticket_id = await _on_sale(platform)
    holder, waiting, cancelled = (str(uuid.uuid4()) for _ in range(3))
    await _handle(db, service.reserve, ticket_id, holder)
    with pytest.raises(RetryLater):
        await _handle(db, service.reserve, ticket_id, waiting)
    await _handle(db, service.release, ticket_id, cancelled)
    await _handle(db, service.reserve, ticket_id, cancelled)  # nothing left to do
    ticket = await _ticket(db, ticket_id)
    assert (ticket.order_id, ticket.version) == (holder, 1)
