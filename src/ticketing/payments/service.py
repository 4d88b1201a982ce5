"""Use cases of the payments service. They take a session and flush; the caller commits,
except `pay`, which must talk to Stripe between its transactions."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from ticketing.common.db import Database, insert_ignoring_duplicates, utcnow
from ticketing.common.errors import (
    BadRequest,
    NotAuthorized,
    NotFound,
    PaymentRequired,
    ServiceUnavailable,
)
from ticketing.common.events import (
    LEAST_CARD_PAYMENT,
    OrderCancelled,
    OrderCompleted,
    OrderCreated,
    PaymentCreated,
)
from ticketing.common.ids import is_id
from ticketing.common.messaging import RetryLater, is_next_version, replicated
from ticketing.common.outbox import add_event
from ticketing.payments.charges import CardDeclined, ChargeRefused, Charges
from ticketing.payments.models import DeclinedAttempt, OrderReplica, Payment

log = logging.getLogger(__name__)

CANCELLED_NOTE = "Refunded: the order was cancelled before the payment completed"
WRONG_AMOUNT_NOTE = "Refunded: the amount charged was not the order's price"


@dataclass(frozen=True)
class Amount:
    """What a charge took: the order's price in cents, in usd, for a charge made here."""

    cents: int
    currency: str = "usd"


def cents(price: Decimal) -> int:
    return int((price * 100).to_integral_value())


# An order under it cannot be paid by card: it is refused before any charge is tried.
MIN_CHARGE_CENTS = cents(LEAST_CARD_PAYMENT)


async def _payable(session: AsyncSession, *, order_id: str, user_id: str) -> OrderReplica:
    order = await session.get(OrderReplica, order_id) if is_id(order_id) else None
    if order is None:
        raise NotFound("Order not found")
    if order.user_id != user_id:
        raise NotAuthorized()
    if order.status == "cancelled":
        raise BadRequest("Cannot pay for a cancelled order")
    if order.status == "complete" or await _succeeded_payment(session, order_id) is not None:
        raise BadRequest("This order has already been paid")
    if order.expires_at <= utcnow():
        raise BadRequest("Cannot pay for an expired order")
    return order


async def _succeeded_payment(session: AsyncSession, order_id: str) -> Payment | None:
    query = select(Payment).where(Payment.order_id == order_id, Payment.status == "succeeded")
    return await session.scalar(query)


async def pay(
    db: Database,
    charges: Charges,
    *,
    order_id: str,
    user_id: str,
    token: str,
) -> Payment:
    """Charge the buyer for their order; a retried request reuses the attempt's key."""
    amount, attempt = await _next_attempt(db, order_id=order_id, user_id=user_id)
    if amount < MIN_CHARGE_CENTS:
        raise BadRequest(f"A card can pay {LEAST_CARD_PAYMENT} or more, not less")
    try:
        intent = await charges.charge(
            amount_cents=amount,
            token=token,
            order_id=order_id,
            idempotency_key=f"order-{order_id}-attempt-{attempt}",
        )
    except ChargeRefused as refused:
        # Not an attempt: Stripe keeps no result under a key whose request it refused before
        # charging, so the next request may use the key again. Counting it would give a
        # request sent meanwhile with a good card (still charging under this key) a second
        # charge under the next key.
        raise BadRequest(refused.message, field=refused.field) from None
    except CardDeclined as declined:
        # An attempt: the decline is kept under its key, and the next card needs a key of its own.
        await _record_decline(db, order_id=order_id, attempt=attempt, reason=declined.message)
        raise PaymentRequired(declined.message) from None
    payment = await record_charge(
        db, charges, order_id=order_id, stripe_id=intent, amount=Amount(amount)
    )
    if payment.status == "refunded":
        # The order was cancelled while the card was being charged; the payment record
        # keeps the refund and says why.
        raise BadRequest("Cannot pay for a cancelled order")
    return payment


async def _next_attempt(db: Database, *, order_id: str, user_id: str) -> tuple[int, int]:
    """The amount to charge and the number of this attempt, once the order is payable.

    A buyer may pay the moment the order's 201 arrives, before order:created has reached the
    replica here: an order not found is looked for again for a moment."""

    async def read() -> tuple[int, int] | None:
        try:
            async with db.transaction() as session:
                order = await _payable(session, order_id=order_id, user_id=user_id)
                declined = await session.scalar(
                    select(func.count()).where(DeclinedAttempt.order_id == order_id)
                )
                return cents(order.price), int(declined or 0) + 1
        except NotFound:
            if not is_id(order_id):
                raise
            return None

    found = await read() or await replicated(read)
    if found is None:
        raise NotFound("Order not found")
    return found


async def _record_decline(db: Database, *, order_id: str, attempt: int, reason: str) -> None:
    # A replayed decline of the same attempt (a double click) is the same decline: one row.
    with contextlib.suppress(IntegrityError):
        async with db.transaction() as session:
            exists = await session.scalar(
                select(DeclinedAttempt.id).where(
                    DeclinedAttempt.order_id == order_id, DeclinedAttempt.attempt == attempt
                )
            )
            if exists is None:
                session.add(DeclinedAttempt(order_id=order_id, attempt=attempt, reason=reason))


async def record_charge(
    db: Database, charges: Charges, *, order_id: str, stripe_id: str, amount: Amount
) -> Payment:
    """Record a succeeded charge in its own transaction, from the request or a webhook."""
    # The same charge seen twice at once (a retried request, or its webhook): one insert wins,
    # the other fails on the unique stripe id, and its retry finds the recorded payment.
    return await db.retrying(
        lambda s: record_success(s, charges, order_id=order_id, stripe_id=stripe_id, amount=amount),
        retry_on=(IntegrityError,),
    )


async def record_success(
    session: AsyncSession, charges: Charges, *, order_id: str, stripe_id: str, amount: Amount
) -> Payment:
    """Record a succeeded charge once, whether it is seen by the request or by a webhook.

    A charge for an order that was cancelled meanwhile, or that another charge already paid,
    is refunded and kept with a note saying why.
    """
    # Locked, so a cancellation handled concurrently sees this payment or waits for it, and
    # so does the same charge recorded at once by the request and its webhook.
    order = await session.get(OrderReplica, order_id, with_for_update=True)
    if order is None:
        raise RetryLater(f"order {order_id} not known here yet")
    # Only under the lock: read before it, the other path's commit could be missed, and this
    # charge "already paid" by itself would be refunded.
    known = await session.scalar(select(Payment).where(Payment.stripe_id == stripe_id))
    if known is not None:
        return known
    paid_before = await _succeeded_payment(session, order_id)
    payment = Payment(order_id=order_id, stripe_id=stripe_id, amount_cents=amount.cents)
    session.add(payment)
    if amount != Amount(cents(order.price)):
        # Not a charge this service made (it charges the order's price): whatever made it on
        # the account, it does not pay for the order.
        await _refund(charges, payment, note=WRONG_AMOUNT_NOTE)
    elif order.status == "cancelled":
        await _refund(charges, payment, note=CANCELLED_NOTE)
    elif paid_before is not None:
        await _refund(charges, payment, note="Refunded: the order was already paid")
    else:
        await session.flush()
        add_event(session, PaymentCreated(id=payment.id, order_id=order_id, stripe_id=stripe_id))
    await session.flush()
    return payment


async def _refund(charges: Charges, payment: Payment, *, note: str) -> None:
    payment.refund_id = await charges.refund(payment_intent=payment.stripe_id)
    payment.status = "refunded"
    payment.note = note
    log.warning("payment %s for order %s refunded: %s", payment.stripe_id, payment.order_id, note)


async def orders_created(session: AsyncSession, events: Sequence[OrderCreated]) -> None:
    """Add the orders to the replica; one plain statement for all of them (every order of a
    rush comes here), which leaves a replica already there as it is."""
    connection = await session.connection()
    rows = [
        {
            "id": event.id,
            "user_id": event.user_id,
            "ticket_id": event.ticket.id,
            "price": event.ticket.price,
            "status": event.status,
            "expires_at": event.expires_at,
            "version": event.version,
        }
        for event in events
    ]
    await connection.execute(
        insert_ignoring_duplicates(OrderReplica, connection.dialect.name), rows
    )


async def _next_version(session: AsyncSession, order_id: str, version: int) -> OrderReplica | None:
    """The replica if `version` is the next one; None if stale; RetryLater if early."""
    order = await session.get(OrderReplica, order_id, with_for_update=True)
    local = order.version if order else None
    return order if is_next_version(local, version, what=f"order {order_id}") else None


async def order_cancelled(session: AsyncSession, charges: Charges, event: OrderCancelled) -> None:
    """Mark the order cancelled, and refund a payment that landed for it anyway."""
    order = await _next_version(session, event.id, event.version)
    if order is None:
        return
    order.status = "cancelled"
    order.version = event.version
    paid = await _succeeded_payment(session, event.id)
    if paid is not None:
        try:
            await _refund(charges, paid, note=CANCELLED_NOTE)
        except ServiceUnavailable as unavailable:
            # Stripe is down: keep the event until the refund goes through (for up to a day).
            raise RetryLater(str(unavailable), delay=5.0) from None
    await session.flush()


async def order_completed(session: AsyncSession, event: OrderCompleted) -> None:
    order = await _next_version(session, event.id, event.version)
    if order is None:
        return
    order.status = "complete"
    order.version = event.version
