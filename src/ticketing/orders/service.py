"""Use cases of the orders service. They take a session and flush; the caller commits. Only
create_order, which every attempt of a rush runs, takes the database and picks its own
connections."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from functools import cache
from typing import Any

from sqlalchemy import Select, Update, and_, bindparam, literal_column, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.sql.dml import ReturningUpdate

from ticketing.common.db import Database, next_version, one_of, utcnow
from ticketing.common.errors import BadRequest, NotAuthorized, NotFound
from ticketing.common.events import (
    OrderCancelled,
    OrderCompleted,
    OrderCreated,
    OrderTicket,
    TicketCreated,
    TicketRef,
    TicketUpdated,
)
from ticketing.common.ids import new_id
from ticketing.common.messaging import RetryLater, is_next_version, replicated
from ticketing.common.outbox import add_event, insert_with_event_on_driver, update_with_event
from ticketing.orders.models import Order, OrderStatus, TicketReplica

log = logging.getLogger(__name__)

ALREADY_RESERVED = "Ticket is already reserved"


@dataclass(frozen=True)
class OrderedTicket:
    """The ticket of a new order, as the buyer sees it."""

    id: str
    title: str
    price: Decimal
    version: int


@dataclass(frozen=True)
class PlacedOrder:
    """A new order as the buyer sees it, with the ticket it holds."""

    id: str
    user_id: str
    status: str
    expires_at: datetime
    version: int
    ticket: OrderedTicket


async def create_order(
    db: Database, *, user_id: str, ticket_id: str, ttl_seconds: int
) -> PlacedOrder:
    """Reserve a ticket for the buyer; exactly one of any number of concurrent buyers wins.

    Every attempt of a rush runs this, most of them to lose: a losing attempt costs one read,
    on the driver's connection (`Database.read_first`). A winner then writes without a
    transaction, each write one atomic statement with its event: an expired holder's
    cancellation (`Database.autocommit`), then the order, through the driver as the read; the
    read was never in a transaction with them: the partial unique index decides."""
    params = {"ticket_id": ticket_id}
    row = await db.read_first(_ticket_and_holder(), params)
    if row is None:
        # Listed a moment ago, perhaps, and on its way to the replica here.
        row = await replicated(lambda: db.read_first(_ticket_and_holder(), params))
    if row is None:
        raise NotFound("Ticket not found")
    if row["user_id"] == user_id:
        raise BadRequest("You cannot buy your own ticket", field="ticketId")
    held = row["holder_id"] is not None
    # Most attempts of a rush end here, decided on the holder's plain columns.
    if held and _still_holds(OrderStatus(row["holder_status"]), row["holder_expires_at"]):
        raise BadRequest(ALREADY_RESERVED)
    if held:
        async with db.autocommit() as connection:
            await _free_expired_hold(connection, row)
    return await _insert_order(db, user_id=user_id, ticket=row, ttl_seconds=ttl_seconds)


async def _insert_order(
    db: Database, *, user_id: str, ticket: Mapping[str, Any], ttl_seconds: int
) -> PlacedOrder:
    now = utcnow()
    order = PlacedOrder(
        id=new_id(),
        user_id=user_id,
        status=OrderStatus.CREATED.value,
        expires_at=now + timedelta(seconds=ttl_seconds),
        version=next_version(None),
        ticket=OrderedTicket(
            id=ticket["id"], title=ticket["title"], price=ticket["price"], version=ticket["version"]
        ),
    )
    created = OrderCreated(
        id=order.id,
        version=order.version,
        status=order.status,
        user_id=user_id,
        expires_at=order.expires_at,
        ticket=OrderTicket(id=order.ticket.id, price=order.ticket.price),
    )
    values = {"ticket_id": order.ticket.id, "created_at": now}
    try:
        # The partial unique index decides the race here.
        await insert_with_event_on_driver(db, Order, {**_order_columns(order), **values}, created)
    except IntegrityError:
        raise BadRequest(ALREADY_RESERVED) from None
    return order


def _order_columns(order: PlacedOrder) -> dict[str, Any]:
    return {
        "id": order.id,
        "user_id": order.user_id,
        "status": order.status,
        "expires_at": order.expires_at,
        "version": order.version,
        "price": order.ticket.price,
        "held": False,
        "paid": False,
    }


@cache
def _ticket_and_holder() -> Select[Any]:
    tickets, orders = TicketReplica.__table__.c, Order.__table__.c
    # The status is written into the SQL, not bound: the driver prepares the statement once,
    # and PostgreSQL's generic plan for it may only use the partial index on the holder's
    # ticket (WHERE status <> 'cancelled') when the query states that predicate itself. With a
    # parameter there, each attempt read every order.
    active = orders.status != literal_column(f"'{OrderStatus.CANCELLED.value}'")
    holds = and_(orders.ticket_id == tickets.id, active)
    return (
        select(
            tickets.id,
            tickets.title,
            tickets.price,
            tickets.version,
            tickets.user_id,
            orders.id.label("holder_id"),
            orders.status.label("holder_status"),
            orders.expires_at.label("holder_expires_at"),
            orders.version.label("holder_version"),
        )
        .outerjoin_from(TicketReplica.__table__, Order.__table__, holds)
        .where(tickets.id == bindparam("ticket_id"))
    )


def _still_holds(status: OrderStatus, expires_at: datetime) -> bool:
    """An order holds its ticket while paid, or unpaid within its window."""
    return status is not OrderStatus.CREATED or expires_at > utcnow()


async def _free_expired_hold(connection: AsyncConnection, row: Mapping[str, Any]) -> None:
    """Cancel the ticket's holder, whose window has passed, with its event; refuse if it still
    holds: paid since, or cancelled by another buyer first (the update then finds nothing to
    change, its version having moved on)."""
    holder_id, holder_version = row["holder_id"], row["holder_version"]
    params = {"order_id": holder_id, "version": holder_version, "now": utcnow()}
    cancelled = OrderCancelled(
        id=holder_id, version=next_version(holder_version), ticket=TicketRef(id=row["id"])
    )
    if not await update_with_event(connection, _cancel_if_expired(), params, cancelled):
        raise BadRequest(ALREADY_RESERVED)


def _update_unpaid(*conditions: Any) -> Update:
    """An update of the unpaid order `order_id`, if `conditions` hold too."""
    orders = Order.__table__.c
    return update(Order).where(
        orders.id == bindparam("order_id"), orders.status == OrderStatus.CREATED.value, *conditions
    )


@cache
def _cancel_if_due() -> Update:
    """Cancel an order whose window has passed unpaid (`order_id`, `now`)."""
    orders = Order.__table__.c
    return _update_unpaid(orders.expires_at <= bindparam("now")).values(
        status=OrderStatus.CANCELLED.value, version=orders.version + 1
    )


@cache
def _cancel_if_expired() -> Update:
    """As _cancel_if_due, only at the version read (the hold another buyer frees)."""
    return _cancel_if_due().where(Order.__table__.c.version == bindparam("version"))


@cache
def _cancel_if_due_returning() -> ReturningUpdate[tuple[int, str]]:
    orders = Order.__table__.c
    return _cancel_if_due().returning(orders.version, orders.ticket_id)


async def _cancel(session: AsyncSession, order: Order) -> None:
    order.status = OrderStatus.CANCELLED
    await session.flush()
    add_event(
        session,
        OrderCancelled(id=order.id, version=order.version, ticket=TicketRef(id=order.ticket_id)),
    )


async def my_orders(session: AsyncSession, *, user_id: str) -> Sequence[Order]:
    query = select(Order).where(Order.user_id == user_id).order_by(Order.created_at, Order.id)
    return (await session.scalars(query)).all()


async def get_order(session: AsyncSession, *, order_id: str, user_id: str) -> Order:
    order = await session.get(Order, order_id)
    if order is None:
        raise NotFound("Order not found")
    if order.user_id != user_id:
        raise NotAuthorized()
    return order


async def cancel_order(session: AsyncSession, *, order_id: str, user_id: str) -> Order:
    """The buyer gives the ticket back; cancelling twice is harmless."""
    order = await get_order(session, order_id=order_id, user_id=user_id)
    if order.status is OrderStatus.COMPLETE:
        raise BadRequest("Cannot cancel a completed order")
    if order.status is OrderStatus.CREATED:
        await _cancel(session, order)
    return order


async def ticket_created(session: AsyncSession, event: TicketCreated) -> None:
    if await session.get(TicketReplica, event.id) is not None:
        return
    session.add(
        TicketReplica(
            id=event.id,
            title=event.title,
            price=event.price,
            user_id=event.user_id,
            version=event.version,
        )
    )


async def ticket_updated(session: AsyncSession, event: TicketUpdated) -> None:
    """Apply an update only in version order: early ones wait, stale ones are dropped.

    One plain statement when the update is the next version, as it nearly always is; the
    replica's version is read only when it is not."""
    connection = await session.connection()
    if (await connection.execute(_apply_next_version(), _new_version(event))).first() is not None:
        await _check_holds(session, [event])
        return
    local = (await connection.execute(_replica_version(), {"ticket_id": event.id})).scalar()
    if is_next_version(local, event.version, what=f"ticket {event.id}"):
        # It was not the next version a moment ago: another delivery is applying it.
        raise RetryLater(f"ticket {event.id} v{event.version} is being applied elsewhere")


async def tickets_updated(session: AsyncSession, events: Sequence[TicketUpdated]) -> None:
    """ticket_updated for several updates in stream order (every order of a rush updates its
    ticket): each applied if it is the next version, all in one round trip, then one read of
    the versions. An update that has not reached the replica then was early (or is being
    applied elsewhere): all of them wait, and each is then handled on its own."""
    if len(events) == 1:
        await ticket_updated(session, events[0])
        return
    connection = await session.connection()
    await connection.execute(_apply_if_next_version(), [_new_version(e) for e in events])
    ticket_ids = sorted({event.id for event in events})
    versions = dict(
        (await connection.execute(_replica_versions(), {"ticket_ids": ticket_ids})).all()
    )
    for event in events:
        local = versions.get(event.id)
        if local is None or local < event.version:
            raise RetryLater(f"ticket {event.id} v{event.version} is not the next version here")
    await _check_holds(session, events)


async def _check_holds(session: AsyncSession, events: Sequence[TicketUpdated]) -> None:
    """The tickets service holds a ticket for an unpaid order: at the price the order was placed
    at, the hold is noted (a payment may then complete the order); at another, the order is
    cancelled.

    The seller may change the price the moment before a buyer orders, while the new price is
    on its way to the replica here: the buyer was told (and would be charged) the old one, the
    seller asked the new one. Neither is held to a price they did not agree to: the order is
    cancelled, its ticket goes back on sale at the seller's price, and a payment made meanwhile
    is refunded (payments refunds a cancelled order's charge). That is why a payment that came
    first was only noted: the order completes here. A hold's event comes once more for the
    sale, when the order is no longer unpaid."""
    holds = {event.order_id: event for event in events if event.order_id is not None}
    if not holds:
        return
    connection = await session.connection()
    placed = await connection.execute(_unpaid_prices(), {"order_ids": sorted(holds)})
    seen = []
    for order_id, price in placed.all():
        hold = holds[order_id]
        if price is None or price == hold.price:
            seen.append(order_id)
            continue
        log.warning("order %s was placed at %s, its ticket %s is now %s: cancelled",
                    order_id, price, hold.id, hold.price)  # fmt: skip
        order = await session.get(Order, order_id)
        if order is not None:
            await _cancel(session, order)
    if not seen:
        return
    noted = await connection.execute(_note_held(), {"order_ids": seen})
    for order_id in [row.id for row in noted.all() if row.paid]:
        order = await session.get(Order, order_id)
        if order is not None:
            await _complete(session, order)


@cache
def _unpaid_prices() -> Select[Any]:
    orders = Order.__table__.c
    return select(orders.id, orders.price).where(
        one_of(orders.id, "order_ids"),
        orders.status == OrderStatus.CREATED.value,
    )


@cache
def _note_held() -> ReturningUpdate[Any]:
    """Not a change of the order (no new version, no event): what this service has seen. Says
    which were paid already. A row's lock orders it with _note_paid: one of the two sees the
    other's write."""
    orders = Order.__table__.c
    return (
        update(Order)
        .where(one_of(orders.id, "order_ids"), orders.held.is_(False))
        .values(held=True)
        .returning(orders.id, orders.paid)
    )


@cache
def _note_paid() -> ReturningUpdate[tuple[str]]:
    """A payment before the hold: noted, as _note_held notes the hold (no version, no event)."""
    orders = Order.__table__.c
    return _update_unpaid(orders.held.is_(False)).values(paid=True).returning(orders.id)


def _new_version(event: TicketUpdated) -> dict[str, Any]:
    return {
        "ticket_id": event.id,
        "new_title": event.title,
        "new_price": event.price,
        "new_version": event.version,
    }


@cache
def _apply_next_version() -> ReturningUpdate[tuple[int]]:
    return _apply_if_next_version().returning(TicketReplica.__table__.c.version)


@cache
def _apply_if_next_version() -> Update:
    tickets = TicketReplica.__table__.c
    return (
        update(TicketReplica)
        .where(
            tickets.id == bindparam("ticket_id"), tickets.version == bindparam("new_version") - 1
        )
        .values(
            title=bindparam("new_title"),
            price=bindparam("new_price"),
            version=bindparam("new_version"),
        )
    )


@cache
def _replica_version() -> Select[int]:
    tickets = TicketReplica.__table__.c
    return select(tickets.version).where(tickets.id == bindparam("ticket_id"))


@cache
def _replica_versions() -> Select[Any]:
    tickets = TicketReplica.__table__.c
    return select(tickets.id, tickets.version).where(one_of(tickets.id, "ticket_ids"))


async def expire(session: AsyncSession, *, order_id: str) -> None:
    """expiration:complete: cancel the order unless it was paid (or already cancelled).

    The orders of a rush expire together: one that is due and unpaid is cancelled by one plain
    statement; only the others (unknown, paid, cancelled, early) are loaded to see why not."""
    connection = await session.connection()
    params = {"order_id": order_id, "now": utcnow()}
    cancelled = (await connection.execute(_cancel_if_due_returning(), params)).first()
    if cancelled is not None:
        ticket = TicketRef(id=cancelled.ticket_id)
        add_event(session, OrderCancelled(id=order_id, version=cancelled.version, ticket=ticket))
        return
    order = await session.get(Order, order_id)
    if order is None:
        log.warning("expiration of unknown order %s ignored", order_id)
        return
    if order.status is not OrderStatus.CREATED:
        return
    early = (order.expires_at - utcnow()).total_seconds()
    if early > 0:
        raise RetryLater(f"order {order_id} expires in {early:.1f}s", delay=early)
    await _cancel(session, order)


async def complete(session: AsyncSession, *, order_id: str) -> None:
    """payment:created: the order is paid. A cancelled order stays cancelled (payments refunds)."""
    order = await session.get(Order, order_id)
    if order is None:
        raise RetryLater(f"order {order_id} not found yet")
    if order.status is not OrderStatus.CREATED:
        if order.status is OrderStatus.CANCELLED:
            log.warning("payment for cancelled order %s: payments refunds it", order_id)
        return
    if order.held is False:
        # Paid the moment the 201 came: the hold may yet turn out to be at another price. The
        # hold, when it comes, completes the order (or cancels it, and payments refunds).
        connection = await session.connection()
        if (await connection.execute(_note_paid(), {"order_id": order_id})).first():
            return
        await session.refresh(order)  # held meanwhile: complete it here
        if order.status is not OrderStatus.CREATED:
            return
    await _complete(session, order)


async def _complete(session: AsyncSession, order: Order) -> None:
    order.status = OrderStatus.COMPLETE
    await session.flush()
    add_event(
        session,
        OrderCompleted(id=order.id, version=order.version, ticket=TicketRef(id=order.ticket_id)),
    )
