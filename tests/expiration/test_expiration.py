"""The expiration service on real Redis and JetStream: one delayed job per order."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from tests.conftest import Platform, new_user
from tests.support import consumer_settled, eventually, frozen, stream_envelopes
from ticketing.common.events import Envelope, OrderCreated
from ticketing.expiration.jobs import (
    REDIS_TIMEOUT_SECONDS,
    WORKER_HAD_REDIS_SECONDS,
    WORKER_RESTART_LONGEST_SECONDS,
    JobQueue,
    WorkerRestarts,
    lost_redis,
)
from ticketing.expiration.service import Deferred, expiration_event_id, expire_order, job_id
from ticketing.expiration.settings import ExpirationSettings


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


async def test_a_second_delivery_of_an_order_leaves_its_job_as_it_was(platform: Platform) -> None:
    await platform.start("expiration")
    runtime = platform.runtime("expiration")
    order = order_created(expires_in=60)
    await runtime.publisher.publish(Envelope.wrap(order))
    await eventually(lambda: job_scheduled(platform, order.id))
    first = await _job_record(platform, order.id)
    # The same order again (a distinct event id, as from a second publisher).
    await runtime.publisher.publish(Envelope.wrap(order))
    await eventually(lambda: consumer_settled(runtime.bus, "expiration"))
    assert await _job_record(platform, order.id) == first  # not scheduled again


async def _job_record(platform: Platform, order_id: str) -> tuple[bytes | None, float | None]:
    """The job as arq stores it (its enqueue time inside) and when it is due."""
    async with Redis.from_url(platform.settings.redis_url or "") as redis:
        key = job_id(order_id)
        body = await redis.get(f"arq:job:{key}")
        due = await redis.zscore(
            ExpirationSettings(**platform.settings_kwargs).expiration_queue, key
        )
    return body, due


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
    order = order_created(expires_in=6)
    await platform.runtime("expiration").publisher.publish(Envelope.wrap(order))
    await eventually(lambda: job_scheduled(platform, order.id))
    assert await expirations(platform) == []  # stopped before it is due
    await platform.stop("expiration")
    assert await job_scheduled(platform, order.id)  # the job lives in Redis, not the process
    await platform.start("expiration")
    published = await eventually(lambda: expirations(platform))
    assert [e.data["orderId"] for e in published] == [order.id]


async def test_a_job_stopped_mid_announcement_leaves_nothing_running(platform: Platform) -> None:
    """The worker stopping cancels its jobs: an announcement under way ends with its job (it
    lands), not after the service (and its database) stopped."""
    await platform.start("expiration")
    ctx = {"runtime": platform.runtime("expiration"), "job_try": 1}
    order_id = str(uuid.uuid4())
    job = asyncio.create_task(expire_order(ctx, order_id))
    await asyncio.sleep(0)  # the job's first step, which starts its announcement, has run
    assert _announcements() != []
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert _announcements() == []
    published = await eventually(lambda: expirations(platform))
    assert [e.data["orderId"] for e in published] == [order_id]


def _announcements() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "_announce"]


async def test_a_job_that_cannot_reach_its_database_asks_arq_to_retry(tmp_path: Any) -> None:
    from arq import Retry

    from ticketing.common.db import Database

    class Unreachable:
        db = Database("postgresql+asyncpg://nobody@127.0.0.1:1/none")

    with pytest.raises(Retry):
        await expire_order({"runtime": Unreachable(), "job_try": 1}, str(uuid.uuid4()))
    await Unreachable.db.dispose()


async def test_a_job_whose_database_hangs_asks_arq_to_retry_before_arq_times_it_out(
    platform: Platform, monkeypatch: Any
) -> None:
    """arq ends a job it times out for good: the order would never expire. A job whose database
    does not answer (its outbox locked by another client) asks to run again within its bound,
    inside arq's timeout; its announcement goes on and lands once the database answers."""
    from arq import Retry

    from ticketing.expiration import jobs, service

    assert service.ANNOUNCE_WITHIN_SECONDS < jobs.JOB_TIMEOUT_SECONDS
    monkeypatch.setattr(service, "ANNOUNCE_WITHIN_SECONDS", 0.3)
    await platform.start("expiration")
    ctx = {"runtime": platform.runtime("expiration"), "job_try": 1}
    order_id = str(uuid.uuid4())
    async with _outbox_locked(platform.settings.service_database_url("expiration")):
        with pytest.raises(Retry):
            await expire_order(ctx, order_id)
        [left] = _announcements()
        assert not left.done()  # still waiting for the lock
    await left
    published = await eventually(lambda: expirations(platform))
    assert [e.data["orderId"] for e in published] == [order_id]


@contextlib.asynccontextmanager
async def _outbox_locked(database_url: str) -> AsyncIterator[None]:
    """Another client holding the outbox table (PostgreSQL) or the whole file (SQLite)."""
    if database_url.startswith("sqlite"):
        path = database_url.split(":///", 1)[1]
        holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # Off the loop: the service may be writing, and waits for its turn must not stop it.
        await asyncio.to_thread(holder.execute, "BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        return
    connection = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    try:
        async with connection.transaction():
            await connection.execute("LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE")
            yield
    finally:
        await connection.close()


@pytest.fixture
async def own_queue(platform: Platform) -> AsyncIterator[JobQueue]:
    """A running queue of the test's own beside the service's; its keys (those of jobs whose
    ids hold its name) are gone from Redis after the test."""
    await platform.start("expiration")
    queue = JobQueue(f"q-{uuid.uuid4().hex}", platform.settings.redis_url or "", 0.05, 10)
    async with queue.running(platform.runtime("expiration")):
        yield queue
    async with Redis.from_url(platform.settings.redis_url or "") as redis:
        keys = [key async for key in redis.scan_iter(match=f"*{queue.name}*")]
        await redis.delete(*keys)


async def test_a_job_is_scheduled_as_arq_itself_schedules_it(own_queue: JobQueue) -> None:
    """The one-round-trip enqueue writes what arq's enqueue_job writes, and refuses as it does:
    an id already scheduled, or whose job has run (its result kept)."""
    from arq.jobs import Job, JobStatus

    ours = own_queue
    assert ours.pool is not None
    due = datetime.now(UTC) + timedelta(hours=1)
    ids = (f"{ours.name}:ours", f"{ours.name}:arq")
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


async def test_jobs_are_scheduled_together_each_once(own_queue: JobQueue) -> None:
    """Several in one call, each due when it says; an id already scheduled, or twice in the
    call, is scheduled once."""
    from arq.jobs import Job

    ours = own_queue
    assert ours.pool is not None
    now = datetime.now(UTC)
    jobs = [
        Deferred("expire_order", (f"o-{n}",), f"{ours.name}:{n}", now + timedelta(hours=n))
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


async def test_orders_go_on_expiring_after_redis_restarts(
    platform: Platform, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """arq's worker stops for good at its first Redis error: the service starts another."""
    from ticketing.platform.embedded import EmbeddedRedis

    redis_server = EmbeddedRedis(tmp_path / "valkey")
    redis_server.start()
    try:
        await platform.start("expiration", redis_url=redis_server.url)
        with caplog.at_level("WARNING", logger="ticketing.expiration.jobs"):
            redis_server.stop()
            await eventually(lambda: "the job worker lost Redis" in caplog.text)
        redis_server.start()  # the same port and files
        order = order_created(expires_in=2)
        await platform.runtime("expiration").publisher.publish(Envelope.wrap(order))
        published = await eventually(lambda: expirations(platform), within=20)
    finally:
        redis_server.stop()
    assert [e.data["orderId"] for e in published] == [order.id]


async def test_a_redis_that_stops_answering_is_an_error_not_a_hang(
    platform: Platform, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frozen, not gone (no reset on the socket): a call gives up after the read timeout."""
    from redis.exceptions import TimeoutError as RedisTimeout

    from ticketing.expiration import jobs
    from ticketing.platform.embedded import EmbeddedRedis

    monkeypatch.setattr(jobs, "REDIS_TIMEOUT_SECONDS", 0.5)
    redis_server = EmbeddedRedis(tmp_path / "valkey")
    redis_server.start()
    queue = JobQueue(f"q-{uuid.uuid4().hex}", redis_server.url, 0.05, 10)
    try:
        await platform.start("expiration")
        async with queue.running(platform.runtime("expiration")):
            await queue.ping()
            await asyncio.sleep(0.3)  # the worker polls meanwhile: its connections are in use
            assert queue.pool is not None
            pooled = queue.pool.connection_pool._available_connections
            assert pooled and all(c.socket_timeout == 0.5 for c in pooled)
            with frozen(redis_server), pytest.raises(RedisTimeout):
                await asyncio.wait_for(queue.ping(), 30)  # the bound only says it hung
    finally:
        redis_server.stop()


def test_job_workers_that_stop_at_once_are_started_again_ever_more_slowly() -> None:
    """Redis away: each new job worker stops at once, and the pause doubles up to the longest;
    one that had run a while (it had Redis) starts a new outage from a second again, and one
    whose Redis stopped answering (it stops after the read timeout) counts as stopping soon."""
    restarts = WorkerRestarts()
    pauses = [restarts.stopped(ran_for=0.01) for _ in range(8)]
    assert pauses[:4] == [1.0, 2.0, 4.0, 8.0]
    assert pauses[-1] == WORKER_RESTART_LONGEST_SECONDS == max(pauses)
    assert restarts.stopped(ran_for=WORKER_HAD_REDIS_SECONDS + 60) == 1.0
    assert restarts.stopped(ran_for=REDIS_TIMEOUT_SECONDS + 0.1) == 2.0


def test_a_job_worker_cut_off_from_redis_is_an_outage_not_a_bug() -> None:
    """Logged as a warning without a traceback: redis-py's errors, and uvloop's own for a
    write to a connection Redis reset; anything else is a bug, with its traceback."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    uvloop_closed = RuntimeError(
        "unable to perform operation on <TCPTransport closed=True reading=False>;"
        " the handler is closed"
    )
    assert lost_redis(RedisConnectionError("Connection closed by server."))
    assert lost_redis(uvloop_closed)
    assert not lost_redis(RuntimeError("a bug"))
    assert not lost_redis(None)
