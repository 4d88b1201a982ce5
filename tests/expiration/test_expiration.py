"""The expiration service on real Redis and JetStream: one delayed job per order."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.conftest import Platform, new_user
from tests.support import consumer_settled, eventually, stream_envelopes
from ticketing.common.events import Envelope, OrderCreated
from ticketing.expiration.service import Deferred, expiration_event_id, expire_order, job_id


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


async def test_a_job_stopped_mid_announcement_leaves_nothing_running(platform: Platform) -> None:
    """The worker stopping cancels its jobs: an announcement under way ends with its job, not
    after the service (and its database) stopped."""
    await platform.start("expiration")
    ctx = {"runtime": platform.runtime("expiration"), "job_try": 1}
    job = asyncio.create_task(expire_order(ctx, str(uuid.uuid4())))
    await asyncio.sleep(0)  # one turn of the loop: the job has started its announcement
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    left = [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "_announce"]
    assert left == []


async def test_a_job_that_cannot_reach_its_database_asks_arq_to_retry(tmp_path: Any) -> None:
    import pytest
    from arq import Retry

    from ticketing.common.db import Database

    class Unreachable:
        db = Database("postgresql+asyncpg://nobody@127.0.0.1:1/none")

    with pytest.raises(Retry):
        await expire_order({"runtime": Unreachable(), "job_try": 1}, str(uuid.uuid4()))
    await Unreachable.db.dispose()


async def test_a_job_whose_database_hangs_asks_arq_to_retry_before_arq_times_it_out(
    monkeypatch: Any,
) -> None:
    """arq ends a job it times out for good: the order would never expire. The bound holds even
    when giving up takes long too (a rollback waiting on a locked SQLite file)."""
    from arq import Retry

    from ticketing.expiration import service

    answers = asyncio.Event()  # the database, which does not answer until the end

    async def hanging(*_: Any, **__: Any) -> None:
        try:
            await answers.wait()
        except asyncio.CancelledError:
            await answers.wait()  # cancelling does not end it either
            raise

    class Runtime:
        class db:
            @staticmethod
            def autocommit() -> Any:
                return contextlib.nullcontext(None)

    monkeypatch.setattr(service, "announce_expiry", hanging)
    monkeypatch.setattr(service, "ANNOUNCE_WITHIN_SECONDS", 0.05)
    with pytest.raises(Retry):
        await expire_order({"runtime": Runtime(), "job_try": 1}, str(uuid.uuid4()))
    # The announcement the job stopped waiting for is still under way: the database answers.
    [left] = [t for t in asyncio.all_tasks() if "_announce" in t.get_coro().__qualname__]
    answers.set()
    await left


async def test_a_job_is_scheduled_as_arq_itself_schedules_it(platform: Platform) -> None:
    """The one-round-trip enqueue writes what arq's enqueue_job writes, and refuses as it does:
    an id already scheduled, or whose job has run (its result kept)."""
    from arq.jobs import Job, JobStatus

    from ticketing.expiration.jobs import JobQueue

    await platform.start("expiration")
    runtime = platform.runtime("expiration")
    ours = JobQueue(f"q-{uuid.uuid4().hex}", platform.settings.redis_url or "", 0.05, 10)
    async with ours.running(runtime):
        assert ours.pool is not None
        due = datetime.now(UTC) + timedelta(hours=1)
        ids = (f"ours:{uuid.uuid4()}", f"arq:{uuid.uuid4()}")
        job = Deferred("expire_order", ("o-1", 7.5), ids[0], due)
        assert await ours.enqueue_each([job]) == [True]
        assert await ours.enqueue_each([job]) == [False]
        await ours.pool.enqueue_job(
            "expire_order", "o-1", 7.5, _job_id=ids[1], _queue_name=ours.name, _defer_until=due
        )
        infos = [await Job(i, ours.pool, _queue_name=ours.name).info() for i in ids]
        assert all(info is not None for info in infos)
        mine, theirs = infos
        assert mine is not None and theirs is not None
        assert (mine.function, mine.args, mine.kwargs, mine.job_try, mine.score) == (
            theirs.function, theirs.args, theirs.kwargs, theirs.job_try, theirs.score
        )  # fmt: skip
        assert await Job(ids[0], ours.pool, _queue_name=ours.name).status() == JobStatus.deferred
        ttls = [await ours.pool.pttl(f"arq:job:{i}") for i in ids]
        assert abs(ttls[0] - ttls[1]) < 60_000  # both expire a day after they are due
        await ours.pool.set(f"arq:result:{ids[0]}", b"done")
        await ours.pool.delete(f"arq:job:{ids[0]}")
        assert await ours.enqueue_each([job]) == [False]


async def test_jobs_are_scheduled_together_each_once(platform: Platform) -> None:
    """Several in one call, each due when it says; an id already scheduled, or twice in the
    call, is scheduled once."""
    from arq.jobs import Job

    from ticketing.expiration.jobs import JobQueue

    await platform.start("expiration")
    runtime = platform.runtime("expiration")
    ours = JobQueue(f"q-{uuid.uuid4().hex}", platform.settings.redis_url or "", 0.05, 10)
    async with ours.running(runtime):
        assert ours.pool is not None
        now = datetime.now(UTC)
        jobs = [
            Deferred("expire_order", (f"o-{n}",), f"id-{uuid.uuid4()}", now + timedelta(hours=n))
            for n in (1, 2, 3)
        ]
        assert await ours.enqueue_each(jobs[:1]) == [True]
        assert await ours.enqueue_each([*jobs, jobs[1]]) == [False, True, True, False]
        for n, job in enumerate(jobs, start=1):
            info = await Job(job.job_id, ours.pool, _queue_name=ours.name).info()
            assert info is not None
            assert info.args == (f"o-{n}",)
            assert abs(info.score - (now + timedelta(hours=n)).timestamp() * 1000) < 1


async def test_scheduling_before_the_queue_runs_asks_for_a_retry(platform: Platform) -> None:
    import pytest

    from ticketing.common.messaging import RetryLater
    from ticketing.expiration.jobs import JobQueue
    from ticketing.expiration.service import schedule_all

    await platform.start("expiration")
    queue = JobQueue(f"q-{uuid.uuid4().hex}", platform.settings.redis_url or "", 0.05, 10)
    with pytest.raises(RetryLater):
        await schedule_all(queue, events=[order_created(expires_in=60)])


async def test_readiness_says_when_redis_is_down(platform: Platform, tmp_path: Any) -> None:
    """The delayed jobs live in Redis: without it the service is not ready, whatever its
    database and NATS say."""
    import httpx

    from ticketing.platform.embedded import EmbeddedRedis

    redis_server = EmbeddedRedis(tmp_path / "valkey")
    redis_server.start()
    try:
        await platform.start("expiration", redis_url=redis_server.url)
        app = platform.apps["expiration"]
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            ready = await client.get("/readyz")
            assert (ready.status_code, ready.json()["redis"]) == (200, "ok")
            redis_server.stop()

            async def not_ready() -> httpx.Response | None:
                response = await client.get("/readyz")
                return response if response.status_code == 503 else None

            down = await eventually(not_ready)
    finally:
        redis_server.stop()
    assert down.json() == {"status": "unavailable", "database": "ok", "nats": "ok",
                           "listener": "ok", "redis": "down"}  # fmt: skip
