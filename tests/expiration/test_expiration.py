"""The expiration service on real Redis and JetStream: one delayed job per order."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from redis.asyncio import Redis

from tests.conftest import Platform, new_user
from tests.support import consumer_settled, eventually, stream_envelopes
from ticketing.common.events import Envelope, OrderCreated
from ticketing.expiration.service import expiration_event_id, expire_order, job_id


def order_created(*, expires_in: float) -> OrderCreated:
    return OrderCreated.model_validate(
        {
            "id": str(uuid.uuid4()),
            "version": 0,
            "status": "created",
            "userId": new_user(),
            "expiresAt": (datetime.now(UTC) + timedelta(seconds=expires_in)).isoformat(),
            "ticket": {"id": str(uuid.uuid4()), "price": 10},
        }
    )


async def expirations(platform: Platform) -> list[Envelope]:
    return await stream_envelopes(platform.runtime("expiration").bus, "expiration:complete")


async def job_scheduled(platform: Platform, order_id: str) -> bool:
    async with Redis.from_url(platform.settings.redis_url or "") as redis:
        return bool(await redis.exists(f"arq:job:{job_id(order_id)}"))


async def test_an_order_expires_at_its_expires_at(platform: Platform) -> None:
    await platform.start("expiration")
    order = order_created(expires_in=1)
    await platform.runtime("expiration").publisher.publish(Envelope.wrap(order))
    published = await eventually(lambda: expirations(platform))
    assert [e.data for e in published] == [{"orderId": order.id}]
    assert published[0].id == expiration_event_id(order.id)
    assert published[0].time >= order.expires_at


async def test_scheduling_twice_runs_one_job(platform: Platform) -> None:
    await platform.start("expiration")
    runtime = platform.runtime("expiration")
    order = order_created(expires_in=0.5)
    # Two deliveries of the same order (distinct event ids, as from two publishers).
    await runtime.publisher.publish(Envelope.wrap(order))
    await runtime.publisher.publish(Envelope.wrap(order))
    await eventually(lambda: expirations(platform))
    await eventually(lambda: consumer_settled(runtime.bus, "expiration"))
    await eventually(lambda: _relay_idle(platform))
    assert len(await expirations(platform)) == 1


async def _relay_idle(platform: Platform) -> bool:
    from sqlalchemy import func, select

    from ticketing.common.outbox import OutboxEvent

    async with platform.runtime("expiration").db.transaction() as session:
        pending = await session.scalar(
            select(func.count()).select_from(OutboxEvent).where(OutboxEvent.published_at.is_(None))
        )
    return pending == 0


async def test_a_job_that_runs_twice_announces_once(platform: Platform) -> None:
    await platform.start("expiration")
    runtime = platform.runtime("expiration")
    order_id = str(uuid.uuid4())
    ctx: dict[str, Any] = {"runtime": runtime}
    await expire_order(ctx, order_id)
    await expire_order(ctx, order_id)
    await eventually(lambda: expirations(platform))
    await eventually(lambda: _relay_idle(platform))
    assert [e.data["orderId"] for e in await expirations(platform)] == [order_id]


async def test_a_pending_job_survives_a_restart_of_the_service(platform: Platform) -> None:
    await platform.start("expiration")
    order = order_created(expires_in=2)
    await platform.runtime("expiration").publisher.publish(Envelope.wrap(order))
    await eventually(lambda: job_scheduled(platform, order.id))
    await platform.stop("expiration")
    assert await job_scheduled(platform, order.id)  # the job lives in Redis, not the process
    await platform.start("expiration")
    published = await eventually(lambda: expirations(platform))
    assert [e.data["orderId"] for e in published] == [order.id]


async def test_a_job_that_cannot_reach_its_database_asks_arq_to_retry(tmp_path: Any) -> None:
    import pytest
    from arq import Retry

    from ticketing.common.db import Database

    class Unreachable:
        db = Database("postgresql+asyncpg://nobody@127.0.0.1:1/none")

    with pytest.raises(Retry):
        await expire_order({"runtime": Unreachable(), "job_try": 1}, str(uuid.uuid4()))
    await Unreachable.db.dispose()
