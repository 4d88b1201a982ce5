"""The delayed-job queue (arq on Redis): a pool to schedule with and a worker to run jobs."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from arq import Worker
from arq.connections import ArqRedis
from arq.constants import job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms, to_unix_ms
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from ticketing.common.app import Runtime
from ticketing.common.backoff import Backoff
from ticketing.common.messaging import RetryLater
from ticketing.expiration import service
from ticketing.expiration.settings import ExpirationSettings

log = logging.getLogger(__name__)

# A job waits up to a second, then announces within service.ANNOUNCE_WITHIN_SECONDS or asks to
# be run again: a job arq times out would be over for good. arq hands the job of a process
# that died mid-job to another worker only once this, plus IN_PROGRESS_SLACK_SECONDS, has
# passed: that long, an order whose job was cut off stays unexpired (its ticket off sale).
# Running a job twice is harmless: its announcement has an id of its own.
JOB_TIMEOUT_SECONDS = 1 + service.ANNOUNCE_WITHIN_SECONDS + 4
IN_PROGRESS_SLACK_SECONDS = 1
# A pause before a worker that stopped is replaced (Redis away, each try fails at once),
# doubled after each try that failed soon, up to the longest.
WORKER_RESTART_SECONDS = 1.0
WORKER_RESTART_LONGEST_SECONDS = 30.0
REDIS_TIMEOUT_SECONDS = 5.0
# A job worker that ran this long had Redis: one that cannot connect stops within a second,
# one whose Redis stops answering after the read timeout.
WORKER_HAD_REDIS_SECONDS = REDIS_TIMEOUT_SECONDS + 1.0
STOP_WITHIN_SECONDS = 5.0  # how long a stop waits for the job worker and Redis

# arq's enqueue_job for several jobs: the same checks and writes for each, in one round trip
# instead of three each (WATCH, EXISTS, then MULTI to EXEC). A script runs atomically: no second
# job for an id, and none for an id whose job has already run (its result is kept). KEYS: the
# queue, then each job's key and result key; ARGV: each job's expiry, body, score and id.
_ENQUEUE_EACH = """
local scheduled = {}
for j = 1, (#KEYS - 1) / 2 do
  local job_key, result_key, a = KEYS[2 * j], KEYS[2 * j + 1], 4 * (j - 1)
  if redis.call('exists', job_key, result_key) > 0 then
    scheduled[j] = 0
  else
    redis.call('psetex', job_key, ARGV[a + 1], ARGV[a + 2])
    redis.call('zadd', KEYS[1], ARGV[a + 3], ARGV[a + 4])
    scheduled[j] = 1
  end
end
return scheduled
"""


async def _cancel_jobs(worker: Worker) -> None:
    """Stop what a worker that has itself stopped still runs, as its close would."""
    running = [job for job in worker.tasks.values() if not job.done()]
    for job in running:
        job.cancel()
    await asyncio.gather(*running, return_exceptions=True)


async def _close(worker: Worker, pool: ArqRedis) -> None:
    """What arq's close does once the jobs are stopped: the worker's health-check key goes, and
    the connections. With Redis gone, closing them is all there is left to do."""
    try:
        await asyncio.wait_for(pool.delete(worker.health_check_key), STOP_WITHIN_SECONDS)
    except (RedisError, TimeoutError) as exc:
        log.warning("the job worker stopped without reaching Redis: %r", exc)
    await pool.aclose()


def lost_redis(error: BaseException | None) -> bool:
    """Whether a job worker stopped because its Redis connection went (an outage, not a bug).
    Under uvloop, redis-py writing to a connection Redis has reset raises uvloop's own
    RuntimeError ("the handler is closed"), not a ConnectionError."""
    if isinstance(error, RedisError):
        return True
    return isinstance(error, RuntimeError) and "handler is closed" in str(error)


class WorkerRestarts:
    """The pause before another job worker starts: a second after one that had run a while
    (it had Redis: this outage is new), doubled for each in a row that stopped soon after it
    started (Redis still away), up to the longest."""

    def __init__(self) -> None:
        # of job workers in a row that stopped soon after they started
        self.backoff = Backoff(WORKER_RESTART_SECONDS, WORKER_RESTART_LONGEST_SECONDS)

    def stopped(self, ran_for: float) -> float:
        """Note a job worker that stopped after `ran_for` seconds; the pause before the next."""
        if ran_for > WORKER_HAD_REDIS_SECONDS:
            self.backoff.succeeded()
        return self.backoff.failed()


class JobQueue:
    """Holds the connection once the service has started; handlers read it from here."""

    def __init__(self, name: str, redis_url: str, poll_seconds: float, max_jobs: int) -> None:
        self.name = name
        self.redis_url = redis_url
        self.poll_seconds = poll_seconds
        self.max_jobs = max_jobs
        self.pool: ArqRedis | None = None
        self._enqueue_each: AsyncScript | None = None

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
        # arq's create_pool sets no read timeout: a Redis cut off without a reset (a frozen
        # host, a network split) would hold every call for the kernel's TCP timeout, some 15
        # minutes. arq sends no blocking command, so an answer slower than this means Redis
        # is away. (No connection is made here: the worker's loop copes with Redis away.)
        self.pool = ArqRedis.from_url(
            self.redis_url, socket_timeout=REDIS_TIMEOUT_SECONDS, socket_connect_timeout=1.0
        )
        self._enqueue_each = self.pool.register_script(_ENQUEUE_EACH)
        workers: list[Worker] = []
        task = asyncio.create_task(self._keep_working(runtime, workers), name="expiration-worker")
        try:
            yield
        finally:
            task.cancel()
            # Bounded: with Redis away, redis-py can sit on a cancellation while it retries a
            # connection, and the service's stop must not wait on that.
            if not (await asyncio.wait({task}, timeout=STOP_WITHIN_SECONDS))[0]:
                log.warning("the job worker did not stop within %.0f s", STOP_WITHIN_SECONDS)
            # Every job stopped first (each lets its announcement end, up to 5 s, all at once):
            # arq's close stops at the first job that fails, with Redis gone say.
            await asyncio.gather(*(_cancel_jobs(worker) for worker in workers))
            if workers:
                await _close(workers[-1], self.pool)
            self.pool = self._enqueue_each = None

    async def _keep_working(self, runtime: Runtime, workers: list[Worker]) -> None:
        """arq's worker stops for good at its first Redis error (a restart, a network blip), and
        every order due after it would stay unexpired: another one starts, until the service
        stops. Jobs the stopped one had started go on (each announces once, whoever runs it)."""
        restarts = WorkerRestarts()
        while True:
            worker = self._worker(runtime)
            # Kept while it runs, and after while jobs it started do (for the stop to end them).
            workers[:] = [w for w in workers if any(not t.done() for t in w.tasks.values())]
            workers.append(worker)
            started = time.monotonic()
            error: BaseException | None = None
            try:
                await worker.async_run()
            except Exception as exc:
                error = exc
            pause = restarts.stopped(ran_for=time.monotonic() - started)
            if lost_redis(error):
                log.warning(
                    "the job worker lost Redis (%s); another starts in %.0f s", error, pause
                )
            else:
                log.error("the job worker stopped; another starts in %.0f s", pause, exc_info=error)
            await asyncio.sleep(pause)

    def _worker(self, runtime: Runtime) -> Worker:
        assert self.pool is not None
        worker = Worker(
            functions=[service.expire_order],
            queue_name=self.name,
            redis_pool=self.pool,
            handle_signals=False,
            poll_delay=self.poll_seconds,
            max_jobs=self.max_jobs,
            job_timeout=JOB_TIMEOUT_SECONDS,
            ctx={"runtime": runtime},
            keep_result=3600,
            max_tries=10_000,  # a job retries until it can announce the expiry
        )
        # arq hands the jobs of a process that died to another worker once their in-progress
        # mark lapses, the job timeout plus ten seconds: slack against running a job twice,
        # which is harmless here (an announcement has an id of its own). One second of it:
        # after a crash, the orders whose jobs were cut off expire ten seconds sooner.
        worker.in_progress_timeout_s = JOB_TIMEOUT_SECONDS + IN_PROGRESS_SLACK_SECONDS
        return worker

    async def ping(self) -> None:
        """Raises unless the queue runs and Redis answers."""
        if self.pool is None:
            raise RetryLater("the job queue is not running")
        await self.pool.ping()

    async def enqueue_each(self, jobs: Sequence[service.Deferred]) -> list[bool]:
        """Schedule jobs as arq's enqueue_job does, all in one round trip; says of each whether
        it was scheduled (not if its id was already scheduled, or has run, or came earlier in
        `jobs`). Raises RetryLater when the queue is not running, RedisError when Redis cannot
        be reached."""
        if self.pool is None or self._enqueue_each is None:
            raise RetryLater("the job queue is not running")
        keys: list[str] = [self.name]
        args: list[Any] = []
        enqueued_ms = timestamp_ms()
        for job in jobs:
            score = to_unix_ms(job.defer_until)
            expires_ms = score - enqueued_ms + self.pool.expires_extra_ms
            body = serialize_job(
                job.function, job.args, {}, None, enqueued_ms, serializer=self.pool.job_serializer
            )
            keys += [job_key_prefix + job.job_id, result_key_prefix + job.job_id]
            args += [expires_ms, body, score, job.job_id]
        return [bool(done) for done in await self._enqueue_each(keys=keys, args=args)]
