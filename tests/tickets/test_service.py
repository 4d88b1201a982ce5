"""The tickets service's event handling when two processes handle one order's events at once."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, select, text

from tests.conftest import Platform, new_user
from tests.support import eventually
from tests.tickets.test_routes import create
from ticketing.common.db import Database
from ticketing.common.events import Envelope, OrderCreated
from ticketing.common.messaging import Delivered, RetryLater
from ticketing.common.outbox import OutboxEvent
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


def _created(ticket_id: str, order_id: str | None = None) -> OrderCreated:
    return OrderCreated.model_validate(
        {
            "id": order_id or str(uuid.uuid4()),
            "version": 0,
            "status": "created",
            "userId": new_user(),
            "expiresAt": (datetime.now(UTC) + timedelta(minutes=15)).isoformat(),
            "ticket": {"id": ticket_id, "price": 10},
        }
    )


async def _reserve_all(db: Database, *orders: OrderCreated) -> None:
    async with db.transaction() as session:
        await service.reserve_all(session, [Delivered(o, f"req-{o.id}") for o in orders])


async def _events(db: Database) -> list[Envelope]:
    async with db.transaction() as session:
        rows = await session.scalars(select(OutboxEvent.body).order_by(OutboxEvent.seq))
        return [Envelope.model_validate_json(body) for body in rows]


async def _correlations(db: Database) -> dict[str, str | None]:
    async with db.transaction() as session:
        rows = await session.execute(select(OutboxEvent.event_id, OutboxEvent.correlation_id))
        return {event_id: correlation for event_id, correlation in rows}


async def test_orders_created_one_after_another_are_held_together_as_one_by_one(
    platform: Platform,
) -> None:
    """Each ticket held by its order with its next version, and its ticket:updated written in
    the order of the orders, with the correlation id of the order's request; handed on to be
    published at the commit."""
    db, first = await _on_sale(platform)
    async with platform.client(new_user()) as seller:
        second = (await create(seller))["id"]
    handed: list[str] = []
    db.on_commit(lambda rows: handed.extend(row["event_id"] for row in rows))
    orders = [_created(second), _created(first)]
    before = {e.id for e in await _events(db)}
    await _reserve_all(db, *orders)
    for order in orders:
        ticket = await _ticket(db, order.ticket.id)
        assert (ticket.order_id, ticket.version) == (order.id, 1)
    updates = [e for e in await _events(db) if e.id not in before]
    assert [(e.type, e.data["id"], e.data["orderId"], e.data["version"]) for e in updates] == [
        ("ticket:updated", o.ticket.id, o.id, 1) for o in orders
    ]
    correlations = await _correlations(db)
    assert [correlations[e.id] for e in updates] == [f"req-{o.id}" for o in orders]
    assert handed == [e.id for e in updates]


async def test_orders_created_together_skip_what_is_done_and_what_was_cancelled(
    platform: Platform,
) -> None:
    db, held = await _on_sale(platform)
    async with platform.client(new_user()) as seller:
        cancelled_on, free = [(await create(seller))["id"] for _ in range(2)]
    holder = await _hold_with(db, held)
    gone = _created(cancelled_on)
    await _handle(db, service.release, cancelled_on, gone.id)  # cancelled before it came
    before = len(await _events(db))
    await _reserve_all(db, _created(held, holder), gone, new := _created(free))
    assert [e.data["orderId"] for e in (await _events(db))[before:]] == [new.id]  # one event
    assert [(t.order_id, t.version) for t in [await _ticket(db, i) for i in (held, free)]] == [
        (holder, 1),
        (new.id, 1),
    ]
    assert (await _ticket(db, cancelled_on)).order_id is None


async def _hold_with(db: Database, ticket_id: str) -> str:
    order_id = str(uuid.uuid4())
    await _handle(db, service.reserve, ticket_id, order_id)
    return order_id


@pytest.mark.parametrize("case", ["held by another", "twice in the run", "unknown"])
async def test_orders_created_together_wait_as_a_whole_when_one_cannot_be_held_yet(
    platform: Platform, case: str
) -> None:
    """One of them would be retried on its own: the whole run is (the listener then handles
    each on its own), and nothing of it is written."""
    db, ticket_id = await _on_sale(platform)
    async with platform.client(new_user()) as seller:
        other = (await create(seller))["id"]
    holder = await _hold_with(db, ticket_id) if case == "held by another" else None
    first = _created(other)
    blocked = {
        "held by another": [first, _created(ticket_id)],
        "twice in the run": [first, _created(other)],
        "unknown": [first, _created(str(uuid.uuid4()))],
    }[case]
    before = len(await _events(db))
    with pytest.raises(RetryLater):
        await _reserve_all(db, *blocked)
    assert (await _ticket(db, other)).order_id is None
    assert (await _ticket(db, ticket_id)).order_id == holder
    assert len(await _events(db)) == before


async def test_orders_created_together_wait_for_a_cancellation_in_progress(
    platform: Platform,
) -> None:
    """As reserve does alone: a cancellation of one of the orders, being handled elsewhere
    (not committed yet), is waited for on the ticket's lock and then seen."""
    db, ticket_id = await _on_sale(platform)
    if db.is_sqlite:
        pytest.skip("SQLite runs one writing transaction at a time: no two handlers overlap")
    async with platform.client(new_user()) as seller:
        other = (await create(seller))["id"]
    cancelled, kept = _created(ticket_id), _created(other)
    released, commit = asyncio.Event(), asyncio.Event()

    async def cancellation() -> None:
        async with db.transaction() as session:
            await service.release(session, ticket_id=ticket_id, order_id=cancelled.id)
            released.set()
            await commit.wait()

    first = asyncio.create_task(cancellation())
    await released.wait()
    second = asyncio.create_task(_reserve_all(db, kept, cancelled))
    await eventually(lambda: second.done() or _waiting_on_a_lock(db))
    commit.set()
    await asyncio.gather(first, second)
    assert (await _ticket(db, ticket_id)).order_id is None
    assert (await _ticket(db, other)).order_id == kept.id


async def test_an_order_cancelled_before_its_creation_leaves_its_ticket_to_the_next_in_the_run(
    platform: Platform,
) -> None:
    """Two orders of one run on one ticket, the first cancelled before its creation came: the
    second holds the ticket, as it would have handled one by one."""
    db, ticket_id = await _on_sale(platform)
    gone, next_one = _created(ticket_id), _created(ticket_id)
    await _handle(db, service.release, ticket_id, gone.id)
    before = len(await _events(db))
    await _reserve_all(db, gone, next_one)
    ticket = await _ticket(db, ticket_id)
    assert (ticket.order_id, ticket.version) == (next_one.id, 1)
    assert [e.data["orderId"] for e in (await _events(db))[before:]] == [next_one.id]


async def test_a_run_of_orders_on_free_tickets_is_held_in_two_statements(
    platform: Platform,
) -> None:
    """The locks, then the holds with their events (each checked against the released orders
    in the same statement): a round trip fewer than reading the released orders first."""
    db, first = await _on_sale(platform)
    if db.is_sqlite:
        pytest.skip("SQLite handles each event in a transaction of its own: no runs to hold")
    async with platform.client(new_user()) as seller:
        second = (await create(seller))["id"]
    statements: list[str] = []
    orders = [_created(first), _created(second)]
    async with db.transaction() as session:
        ours = (await session.connection()).sync_connection

        def executed(conn: Any, _cursor: Any, sql: str, *_args: Any) -> None:
            if conn is ours:  # not the service's own relay or listener, running meanwhile
                statements.append(sql)

        event.listen(db.engine.sync_engine, "before_cursor_execute", executed)
        try:
            await service.reserve_all(session, [Delivered(o, None) for o in orders])
        finally:
            event.remove(db.engine.sync_engine, "before_cursor_execute", executed)
    assert len(statements) == 2, statements
    assert [(await _ticket(db, o.ticket.id)).order_id for o in orders] == [o.id for o in orders]
