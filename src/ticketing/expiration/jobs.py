"""The delayed-job queue (arq on Redis): a pool to schedule with and a worker to run jobs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from arq import Worker
from arq.connections import ArqRedis, RedisSettings, create_pool

from ticketing.common.app import Runtime
from ticketing.expiration import service
from ticketing.expiration.settings import ExpirationSettings

JOB_TIMEOUT_SECONDS = 60


class JobQueue:
    """Holds the connection once the service has started; handlers read it from here."""

    def __init__(self, name: str, redis_url: str, poll_seconds: float, max_jobs: int) -> None:
        self.name = name
        self.redis_url = redis_url
        self.poll_seconds = poll_seconds
        self.max_jobs = max_jobs
        self.pool: ArqRedis | None = None

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
            self.pool = None
