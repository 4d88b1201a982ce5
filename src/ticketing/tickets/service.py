"""Use cases of the tickets service. They take a session and flush; the caller commits."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from decimal import Decimal
from functools import cache
from typing import Any

from sqlalchemy import Insert, Select, String, Update, bindparam, exists, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm.attributes import flag_modified

from ticketing.common.db import next_version, one_of
from ticketing.common.errors import BadRequest, NotAuthorized, NotFound
from ticketing.common.events import OrderCreated, TicketCreated, TicketUpdated
from ticketing.common.messaging import Delivered, RetryLater
from ticketing.common.outbox import (
    add_event,
    changes_with_events,
    events_of_changed,
    update_each_with_event_in,
    update_with_event_in,
    write_changed_with_events,
)
from ticketing.tickets.models import ReleasedOrder, Ticket

log = logging.getLogger(__name__)


def _updated(ticket: Ticket) -> TicketUpdated:
    return TicketUpdated(
        id=ticket.id,
        version=ticket.version,
        title=ticket.title,
        price=ticket.price,
        user_id=ticket.user_id,
        order_id=ticket.order_id,
    )


async def _changed(session: AsyncSession, ticket: Ticket) -> None:
    """Write a change (the version check happens here) and announce it."""
    await session.flush()
    add_event(session, _updated(ticket))


async def create_ticket(
    session: AsyncSession, *, user_id: str, title: str, price: Decimal
) -> Ticket:
    ticket = Ticket(title=title, price=price, user_id=user_id)
    session.add(ticket)
    await session.flush()
    add_event(
        session,
        TicketCreated(
            id=ticket.id, version=ticket.version, title=title, price=price, user_id=user_id
        ),
    )
    return ticket


async def available_tickets(session: AsyncSession) -> Sequence[Ticket]:
    """Tickets on sale: neither reserved nor sold, oldest first."""
    query = (
        select(Ticket)
        .where(Ticket.order_id.is_(None), Ticket.sold.is_(False))
        .order_by(Ticket.created_at, Ticket.id)
    )
    return (await session.scalars(query)).all()


async def get_ticket(session: AsyncSession, ticket_id: str) -> Ticket:
    ticket = await session.get(Ticket, ticket_id)
    if ticket is None:
        raise NotFound("Ticket not found")
    return ticket


async def update_ticket(
    session: AsyncSession, *, ticket_id: str, user_id: str, title: str, price: Decimal
) -> Ticket:
    ticket = await get_ticket(session, ticket_id)
    if ticket.user_id != user_id:
        raise NotAuthorized()
    if ticket.order_id is not None:  # held, or sold: either way the contract's one message
        raise BadRequest("Cannot edit a reserved ticket")
    ticket.title = title
    ticket.price = price
    # An edit is a new version even when it changes nothing (the contract's version + 1): the
    # row is written, and its event is news to every replica.
    flag_modified(ticket, "title")
    await _changed(session, ticket)
    return ticket


async def reserve(session: AsyncSession, *, ticket_id: str, order_id: str) -> None:
    """order:created: the ticket is held by this order.

    Every order of a rush comes here: plain statements on the session's connection."""
    connection = await session.connection()
    params = {"ticket_id": ticket_id, "order_id": order_id}
    # Locked first, as release() does: an order's creation and cancellation handled at once (by
    # two processes) take turns, and whichever goes second sees what the first committed.
    ticket = (await connection.execute(_ticket_for_update(), params)).first()
    if ticket is None:
        raise RetryLater(f"ticket {ticket_id} is unknown here")
    if ticket.order_id == order_id:
        return  # already done
    if ticket.order_id is None:
        # A statement of its own, after the lock: it sees a cancellation committed while we
        # waited, and then holds nothing (the order was cancelled before its creation came).
        # The lock keeps the row as read, so the event is known before the update, which
        # writes it to the outbox in the same statement.
        version = next_version(ticket.version)
        held = TicketUpdated(**{**ticket._mapping, "version": version, "order_id": order_id})
        await update_with_event_in(session, _hold_unless_released(), params, held)
        return
    if (await connection.execute(_released(), params)).first() is not None:
        return
    # The orders database allows one active order per ticket, so the holder's cancellation is
    # on its way; wait for it rather than steal the ticket.
    raise RetryLater(f"ticket {ticket_id} is still held by order {ticket.order_id}")


async def reserve_all(session: AsyncSession, orders: list[Delivered[OrderCreated]]) -> None:
    """order:created of several orders, one after another in the stream: what reserve does for
    each in turn, in two statements for the whole run: the locks, then the holds with their
    events, each unless its order was released (cancelled before its creation came). A ticket
    found held by another order costs a third between them, reading which orders were
    released: such an order holds nothing, any other waits. A run of one goes through
    reserve."""
    if len(orders) == 1:
        event = orders[0].event
        await reserve(session, ticket_id=event.ticket.id, order_id=event.id)
        return
    connection = await session.connection()
    # Locked in the order of their ids: two runs of reservations alone cannot deadlock.
    ticket_ids = sorted({order.event.ticket.id for order in orders})
    locked = await connection.execute(_tickets_for_update(), {"ticket_ids": ticket_ids})
    tickets = {row.id: dict(row._mapping) for row in locked}
    on_postgresql = connection.dialect.name == "postgresql"
    try:
        # On PostgreSQL the holds' statement checks the released orders itself (see below):
        # they are read first only when a ticket is held by another order, which they decide.
        released = None if on_postgresql else await _released_of(connection, orders)
        holds = _holds(orders, tickets, released=released)
    except _HeldByAnother:
        holds = _holds(orders, tickets, released=await _released_of(connection, orders))
    if on_postgresql:
        # A statement after the locks: it sees a cancellation committed while we waited, and
        # none of these orders can be released before we commit (release locks first).
        await write_changed_with_events(session, _hold_each_unless_released(), holds)
    elif holds:
        await update_each_with_event_in(session, _hold(), holds)


async def _released_of(
    connection: AsyncConnection, orders: list[Delivered[OrderCreated]]
) -> set[str]:
    """Which of these orders were released (cancelled before their creation came)."""
    order_ids = [order.event.id for order in orders]
    return set((await connection.execute(_released_among(), {"order_ids": order_ids})).scalars())


class _HeldByAnother(Exception):
    """A ticket of the run is held by another order: whether this one was released decides."""


def _holds(
    orders: list[Delivered[OrderCreated]],
    locked: dict[str, dict[str, Any]],
    *,
    released: set[str] | None,
) -> list[tuple[dict[str, Any], TicketUpdated, str | None]]:
    """The holds of a run of orders on their locked tickets, in stream order, each (its
    parameters, its ticket:updated, its correlation id). With `released` unknown (None), every
    order on a free ticket is taken to hold it: the hold's statement checks the released
    orders itself."""
    tickets = {ticket_id: dict(ticket) for ticket_id, ticket in locked.items()}
    holds: list[tuple[dict[str, Any], TicketUpdated, str | None]] = []
    for order in orders:
        ticket_id, order_id = order.event.ticket.id, order.event.id
        ticket = tickets.get(ticket_id)
        if ticket is None:
            raise RetryLater(f"ticket {ticket_id} is unknown here")
        if ticket["order_id"] == order_id or (released is not None and order_id in released):
            continue  # already done, or cancelled before its creation came: nothing to hold
        if ticket["order_id"] is not None and released is None:
            raise _HeldByAnother(ticket_id)
        if ticket["order_id"] is not None:
            raise RetryLater(f"ticket {ticket_id} is still held by order {ticket['order_id']}")
        ticket.update(version=next_version(ticket["version"]), order_id=order_id)
        params = {"ticket_id": ticket_id, "order_id": order_id}
        holds.append((params, TicketUpdated(**ticket), order.correlation))
    return holds


@cache
def _ticket_for_update() -> Select[Any]:
    """What ticket:updated tells of a ticket (its fields are the columns' names), locked."""
    return _ticket_fields().where(Ticket.__table__.c.id == bindparam("ticket_id")).with_for_update()


@cache
def _tickets_for_update() -> Select[Any]:
    tickets = Ticket.__table__.c
    return (
        _ticket_fields()
        .where(one_of(tickets.id, "ticket_ids"))
        .order_by(tickets.id)
        .with_for_update()
    )


def _ticket_fields() -> Select[Any]:
    tickets = Ticket.__table__.c
    return select(*(tickets[name] for name in TicketUpdated.model_fields))


@cache
def _released_among() -> Select[Any]:
    released = ReleasedOrder.__table__.c
    return select(released.order_id).where(one_of(released.order_id, "order_ids"))


@cache
def _hold() -> Update:
    """A hold that reserve_all has checked: the ticket locked, free, its order not released."""
    tickets = Ticket.__table__.c
    return (
        update(Ticket)
        .where(tickets.id == bindparam("ticket_id"))
        .values(order_id=bindparam("order_id"), version=tickets.version + 1)
    )


@cache
def _hold_each_unless_released() -> Insert:
    """_hold for each of a run's orders whose ticket reserve_all found free and locked, unless
    the order is among the released ones, with the ticket:updated of each hold."""
    tickets, released = Ticket.__table__.c, ReleasedOrder.__table__.c
    holds = changes_with_events({"ticket_id": String, "order_id": String})
    held = (
        update(Ticket)
        .where(
            tickets.id == holds.c.ticket_id,
            ~exists().where(released.order_id == holds.c.order_id),
        )
        .values(order_id=holds.c.order_id, version=tickets.version + 1)
        .returning(holds.c.event_id)
        .cte("held")
    )
    return events_of_changed(holds, held)


@cache
def _released() -> Select[tuple[str]]:
    released = ReleasedOrder.__table__.c
    return select(released.order_id).where(released.order_id == bindparam("order_id"))


@cache
def _hold_unless_released() -> Update:
    """_hold for reserve, which has not read the released orders: it checks them itself."""
    return _hold().where(~exists(_released()))


async def release(session: AsyncSession, *, ticket_id: str, order_id: str) -> None:
    """order:cancelled: free the ticket, but only if this order is the one holding it."""
    ticket = await session.get(Ticket, ticket_id, with_for_update=True)
    if await session.get(ReleasedOrder, order_id) is None:
        session.add(ReleasedOrder(order_id=order_id))
    if ticket is None or ticket.order_id != order_id or ticket.sold:
        log.info("order %s released nothing: ticket %s is not held by it", order_id, ticket_id)
        await session.flush()
        return
    ticket.order_id = None
    await _changed(session, ticket)


async def mark_sold(session: AsyncSession, *, ticket_id: str, order_id: str) -> None:
    """order:completed: the holder paid; the ticket is sold for good."""
    ticket = await session.get(Ticket, ticket_id, with_for_update=True)
    if ticket is None:
        raise RetryLater(f"ticket {ticket_id} is unknown here")
    if ticket.sold and ticket.order_id == order_id:
        return
    if ticket.order_id != order_id:
        raise RetryLater(f"ticket {ticket_id} is not yet reserved by order {order_id}")
    ticket.sold = True
    await _changed(session, ticket)
