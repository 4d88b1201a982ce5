"""Use cases of the expiration service: schedule a job per order, and what the job does."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from arq import Retry
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncConnection

from ticketing.common.events import ExpirationComplete, OrderCreated
from ticketing.common.messaging import RetryLater
from ticketing.common.outbox import insert_event_once

if TYPE_CHECKING:  # the queue's module imports this one, for the job
    from ticketing.expiration.jobs import JobQueue

log = logging.getLogger(__name__)

JOB = "expire_order"
START_AHEAD = timedelta(seconds=1)
_EVENT_NAMESPACE = uuid.UUID("5b0f7c1e-3f52-4c1b-9a55-0c7e6f0a9d21")


@dataclass(frozen=True)
class Deferred:
    """A job to schedule: what it runs, under which id, from when."""

    function: str
    args: tuple[Any, ...]
    job_id: str
    defer_until: datetime


def job_id(order_id: str) -> str:
    return f"expire:{order_id}"


def expiration_event_id(order_id: str) -> str:
    """One event id per order, so a job that runs twice still announces the expiry once."""
    return str(uuid.uuid5(_EVENT_NAMESPACE, f"expiration:{order_id}"))


async def schedule_all(queue: JobQueue, *, events: Sequence[OrderCreated]) -> None:
    """order:created: run each order's job at its expiresAt, all in one round trip; scheduling
    one twice is a no-op.

    A job starts START_AHEAD early and waits out the rest: starting a job is the queue's
    slowest part (several Redis round trips, one job after another), and the orders of a rush
    expire together."""
    jobs = [
        Deferred(
            JOB,
            (event.id, event.expires_at.timestamp()),
            job_id=job_id(event.id),
            defer_until=event.expires_at - START_AHEAD,
        )
        for event in events
    ]
    try:
        scheduled = await queue.enqueue_each(jobs)
    except RedisError as exc:
        raise RetryLater(f"Redis is unavailable: {exc}", delay=2.0) from exc
    for event, done in zip(events, scheduled, strict=True):
        if not done:
            log.info("expiry of order %s was already scheduled", event.id)


async def announce_expiry(connection: AsyncConnection, *, order_id: str) -> None:
    """The job: publish expiration:complete through the outbox, once per order."""
    event = ExpirationComplete(order_id=order_id)
    await insert_event_once(connection, event, event_id=expiration_event_id(order_id))


# How long a job may take to announce its expiry (a database that does not answer, a pool
# with no connection free) before it lets arq run it again.
ANNOUNCE_WITHIN_SECONDS = 5.0


async def _announce(db: Any, order_id: str) -> None:
    async with db.autocommit() as connection:
        await announce_expiry(connection, order_id=order_id)


def _left_behind(task: asyncio.Future[None]) -> None:
    """An announcement the job stopped waiting for: how it ended, for the logs only."""
    if not task.cancelled() and task.exception() is not None:
        log.info("an abandoned announcement ended in %r", task.exception())


async def expire_order(ctx: dict[str, Any], order_id: str, expires_at: float | None = None) -> None:
    """arq entry point; `ctx["runtime"]` is the service's runtime. `expires_at` (a Unix time)
    is when to announce; jobs scheduled without it are due as they start."""
    if expires_at is not None:
        await asyncio.sleep(max(expires_at - time.time(), 0.0))
    announcing = asyncio.ensure_future(_announce(ctx["runtime"].db, order_id))
    try:
        # Bounded well within arq's job timeout (a job that arq times out is over for good),
        # however long the announcement takes to give up (a rollback waiting on a locked
        # SQLite file): it is left to finish on its own; the job's next run announces once.
        await asyncio.wait_for(asyncio.shield(announcing), ANNOUNCE_WITHIN_SECONDS)
    except asyncio.CancelledError:
        # The worker is stopping: an announcement under way ends first (within the bound), so
        # that it does not outlive the service's database (an SQLite write left open would
        # hold the file's lock against the next start); the job's next run announces once.
        await asyncio.wait({announcing}, timeout=ANNOUNCE_WITHIN_SECONDS)
        announcing.cancel()
        raise
    except Exception as exc:
        announcing.add_done_callback(_left_behind)
        # arq retries only on Retry: anything else would end the job and strand the order.
        tries = int(ctx.get("job_try", 1))
        log.warning("expiring order %s failed (try %d): %r", order_id, tries, exc)
        raise Retry(defer=min(tries, 10)) from exc
