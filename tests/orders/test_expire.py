"""expiration:complete as the orders service takes it: a due, unpaid order is cancelled with
its event; anything else is left as it is, or waited for."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select

from tests.conftest import Platform, new_user
from tests.orders.test_routes import seed_ticket
from ticketing.common.db import utcnow
from ticketing.common.events import Envelope, OrderCancelled
from ticketing.common.messaging import RetryLater
from ticketing.common.outbox import OutboxEvent
from ticketing.orders import service
from ticketing.orders.models import Order, OrderStatus


async def an_order(platform: Platform, *, status: OrderStatus, expires_in: float) -> Order:
    order = Order(
        user_id=new_user(),
        ticket_id=await seed_ticket(platform),
        status=status,
        expires_at=utcnow() + timedelta(seconds=expires_in),
        version=0,
    )
    async with platform.runtime("orders").db.transaction() as session:
        session.add(order)
    return order


async def expire(platform: Platform, order_id: str) -> None:
    async with platform.runtime("orders").db.transaction() as session:
        await service.expire(session, order_id=order_id)


async def state(platform: Platform, order_id: str) -> tuple[OrderStatus, int, list[Envelope]]:
    async with platform.runtime("orders").db.transaction() as session:
        order = await session.get(Order, order_id)
        assert order is not None
        bodies = await session.scalars(select(OutboxEvent.body).order_by(OutboxEvent.seq))
        events = [Envelope.model_validate_json(body) for body in bodies]
    mine = [e for e in events if e.type == OrderCancelled.type and e.data["id"] == order_id]
    return order.status, order.version, mine


async def test_a_due_unpaid_order_is_cancelled_once_with_its_event(platform: Platform) -> None:
    await platform.start("orders", run_listeners=False)
    order = await an_order(platform, status=OrderStatus.CREATED, expires_in=-1)
    await expire(platform, order.id)
    await expire(platform, order.id)  # the job ran twice: the second finds it cancelled
    status, version, events = await state(platform, order.id)
    assert (status, version) == (OrderStatus.CANCELLED, 1)
    assert [e.payload() for e in events] == [
        OrderCancelled.model_validate(
            {"id": order.id, "version": 1, "ticket": {"id": order.ticket_id}}
        )
    ]


@pytest.mark.parametrize("paid_or_gone", [OrderStatus.COMPLETE, OrderStatus.CANCELLED])
async def test_a_paid_or_cancelled_order_stays_as_it_is(
    platform: Platform, paid_or_gone: OrderStatus
) -> None:
    await platform.start("orders", run_listeners=False)
    order = await an_order(platform, status=paid_or_gone, expires_in=-1)
    await expire(platform, order.id)
    assert await state(platform, order.id) == (paid_or_gone, 0, [])


async def test_an_order_not_yet_due_is_retried_when_it_is(platform: Platform) -> None:
    await platform.start("orders", run_listeners=False)
    order = await an_order(platform, status=OrderStatus.CREATED, expires_in=30)
    with pytest.raises(RetryLater) as early:
        await expire(platform, order.id)
    assert 25 < early.value.delay <= 30
    assert await state(platform, order.id) == (OrderStatus.CREATED, 0, [])


async def test_an_unknown_order_is_ignored(platform: Platform) -> None:
    await platform.start("orders", run_listeners=False)
    await expire(platform, str(uuid.uuid4()))  # nothing raised: nothing to retry
    async with platform.runtime("orders").db.transaction() as session:
        assert list(await session.scalars(select(OutboxEvent.type))) == []


async def test_an_order_that_falls_due_between_the_two_reads_is_cancelled(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plain statement runs a moment too early to match; the order, loaded to see why, is
    due by then, and is cancelled all the same, with its event."""
    await platform.start("orders", run_listeners=False)
    order = await an_order(platform, status=OrderStatus.CREATED, expires_in=60)
    moments = iter([order.expires_at - timedelta(seconds=1), order.expires_at])
    monkeypatch.setattr(service, "utcnow", lambda: next(moments))
    await expire(platform, order.id)
    status, version, events = await state(platform, order.id)
    assert (status, version) == (OrderStatus.CANCELLED, 1)
    assert [e.data["version"] for e in events] == [1]
