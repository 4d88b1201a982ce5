"""The delayed-job queue (arq on Redis): a pool to schedule with and a worker to run jobs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from arq import Worker
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms, to_unix_ms
from redis.commands.core import AsyncScript

from ticketing.common.app import Runtime
from ticketing.common.messaging import RetryLater
from ticketing.expiration import service
from ticketing.expiration.settings import ExpirationSettings

JOB_TIMEOUT_SECONDS = 60

# arq's enqueue_job: the same checks and writes, in one round trip instead of three (WATCH,
# EXISTS, then MULTI to EXEC). A script runs atomically: no second job for an id, and none for
# an id whose job has already run (its result is kept).
_ENQUEUE_ONCE = """
if redis.call('exists', KEYS[1], KEYS[2]) > 0 then return 0 end
redis.call('psetex', KEYS[1], ARGV[1], ARGV[2])
redis.call('zadd', KEYS[3], ARGV[3], ARGV[4])
return 1
"""


class JobQueue:
    """Holds the connection once the service has started; handlers read it from here."""

    def __init__(self, name: str, redis_url: str, poll_seconds: float, max_jobs: int) -> None:
        self.name = name
        self.redis_url = redis_url
        self.poll_seconds = poll_seconds
        self.max_jobs = max_jobs
        self.pool: ArqRedis | None = None
        self._enqueue_once: AsyncScript | None = None

    @classmethod
    def from_settings(cls, settings: ExpirationSettings) -> JobQueue:
        settings.require_urls("redis_url")
        assert settings.redis_url is not None
        return cls(
            settings.expiration_queue,
            settings.redis_url,
            settings.expiration_poll_seconds,
            settings.expiration_max_jobs,
        )

    @asynccontextmanager
    async def running(self, runtime: Runtime) -> AsyncIterator[None]:
        """Connect, and run a worker in this process for as long as the service runs."""
        self.pool = await create_pool(RedisSettings.from_dsn(self.redis_url))
        self._enqueue_once = self.pool.register_script(_ENQUEUE_ONCE)
        worker = Worker(
            functions=[service.expire_order],
            queue_name=self.name,
            redis_pool=self.pool,
            handle_signals=False,
            poll_delay=self.poll_seconds,
            max_jobs=self.max_jobs,
            # A job waits up to a second, then writes one row. arq leaves the job of a process
            # that died mid-job to others only once this (plus ten seconds) has passed.
            job_timeout=JOB_TIMEOUT_SECONDS,
            ctx={"runtime": runtime},
            keep_result=3600,
            max_tries=10_000,  # a job retries until it can announce the expiry
        )
        task = asyncio.create_task(worker.async_run(), name="expiration-worker")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await worker.close()
            self.pool = self._enqueue_once = None

    async def enqueue_once(
        self, function: str, *args: Any, job_id: str, defer_until: datetime
    ) -> bool:
        """Schedule a job as arq's enqueue_job does; False if its id was already scheduled or
        has run. Raises RetryLater when the queue is not running, RedisError when Redis cannot
        be reached."""
        if self.pool is None or self._enqueue_once is None:
            raise RetryLater("the job queue is not running")
        enqueued_ms, score = timestamp_ms(), to_unix_ms(defer_until)
        expires_ms = score - enqueued_ms + self.pool.expires_extra_ms
        job = serialize_job(
            function, args, {}, None, enqueued_ms, serializer=self.pool.job_serializer
        )
        keys = [job_key_prefix + job_id, result_key_prefix + job_id, self.name]
        return bool(await self._enqueue_once(keys=keys, args=[expires_ms, job, score, job_id]))
