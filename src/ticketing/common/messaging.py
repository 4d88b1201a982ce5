"""Messaging on NATS JetStream: the stream, a deduplicating publisher and durable listeners."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    Header,
    SequenceInfo,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.exc import StaleDataError

from ticketing.common.db import Database
from ticketing.common.errors import is_unavailable
from ticketing.common.events import Envelope, Event, subject_for
from ticketing.common.logs import NATS_CORRELATION_HEADER, correlation_id
from ticketing.common.metrics import ServiceMetrics
from ticketing.common.outbox import DeadLetter, InboxEntry, mark_all_handled, mark_handled
from ticketing.common.settings import Settings

log = logging.getLogger(__name__)

DUPLICATE_WINDOW_SECONDS = 120.0
# How long a publish waits for JetStream's ack (nats-py's default for its API calls).
PUBLISH_ACK_SECONDS = 5.0
# The status of a request that no server took (nats-py's NO_RESPONDERS_STATUS).
NO_RESPONDERS_STATUS = "503"
# How long a fetch that found nothing ready waits for a first event (JetStream then hands over
# what is ready at once, without waiting for the batch to fill); after it, the next message
# alone, as soon as it comes.
FETCH_WINDOW_SECONDS = 0.2
# After a batch that was not full, how long to let the next events gather: they share one
# transaction (under load, most of a listener's cost), at the price of that much lag.
GATHER_SECONDS = 0.005
E = TypeVar("E", bound=Event)
H = TypeVar("H")
Handler = Callable[[AsyncSession, Any], Awaitable[None]]
PlainHandler = Callable[[Any], Awaitable[None]]
BatchHandler = Callable[[AsyncSession, list["Delivered[Any]"]], Awaitable[None]]
PlainBatchHandler = Callable[[list["Delivered[Any]"]], Awaitable[None]]
_Delivery = tuple[Msg, Envelope, Event, H]


# An event that must wait (its predecessor not here yet, a part it needs down) is retried
# soon at first, since what it waits for is usually a moment away, then ever less often, up
# to every RETRY_LONGEST_SECONDS: after MAX_RETRY_LATER attempts, about a day, it is given up
# (dead-lettered), not after minutes, so that an outage of Redis or Stripe loses nothing.
RETRY_QUICKLY = 10
RETRY_LONGEST_SECONDS = 30.0
MAX_RETRY_LATER = 3_000


def retry_delay(base: float, attempt: int) -> float:
    """How long an event waits before its next attempt (`attempt` counts from 1)."""
    doublings = min(max(attempt - RETRY_QUICKLY, 0), 32)  # past the longest long before
    return min(base * 2.0**doublings, RETRY_LONGEST_SECONDS)


PING_INTERVAL_SECONDS = 5
FAILURES_REMEMBERED = 10_000  # events whose failures a listener counts at once
# How long a listener's fetches fail, or come back empty, before it looks whether its stream
# and consumer are still there (and makes them again if not).
BIND_AGAIN_AFTER_SECONDS = 5.0


class RetryLater(Exception):
    """Raised by a handler that cannot act yet (e.g. an event arrived before its predecessor)."""

    def __init__(self, reason: str, *, delay: float = 0.5) -> None:
        super().__init__(reason)
        self.delay = delay


# A client may name what it was just told about (a ticket listed, an order placed) before the
# event that brings it has reached this service's replica: a listener lets events gather for a
# moment to share a transaction. What is not found is looked for again for this long, soon at
# first (the event is usually a few tens of milliseconds away), then less and less often: an id
# that is simply unknown costs a handful of reads, not one every few milliseconds.
REPLICA_WAIT_SECONDS = 1.0
REPLICA_FIRST_POLL_SECONDS = 0.02
REPLICA_LONGEST_POLL_SECONDS = 0.2


async def replicated(read: Callable[[], Awaitable[H | None]]) -> H | None:
    """After `read` found nothing: what it finds when run again, after a pause each time, until
    it finds something or REPLICA_WAIT_SECONDS have passed; None if it never does. The first
    read is the caller's, so that a hit (nearly every request) costs nothing more."""
    deadline = time.monotonic() + REPLICA_WAIT_SECONDS
    pause = REPLICA_FIRST_POLL_SECONDS
    while (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(min(pause, left))
        if (found := await read()) is not None:
            return found
        pause = min(pause * 2, REPLICA_LONGEST_POLL_SECONDS)
    return None


def is_next_version(local: int | None, incoming: int, *, what: str) -> bool:
    """The replica rule: apply only local + 1; drop what is stale; retry what came early.

    `local` is None when the replica has not seen the entity's creation yet.
    """
    if local is None or incoming > local + 1:
        raise RetryLater(f"{what} v{incoming} arrived before its predecessors")
    return incoming == local + 1


def _without_credentials(url: str | None) -> str:
    """A server's address as a log may show it: no user or password (nats://u:p@host)."""
    parts = urlsplit(url or "")
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}:{parts.port}" if parts.port else f"{parts.scheme}://{host}"


class Bus:
    """One NATS connection with JetStream, and the stream every service shares."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.nc: NATS | None = None
        self._js: JetStreamContext | None = None

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "Bus.connect() first"
        return self._js

    @property
    def prefix(self) -> str:
        return self.settings.nats_subject_prefix

    @property
    def stream(self) -> str:
        return self.settings.nats_stream

    async def connect(self) -> None:
        if not self.settings.nats_url:
            raise ValueError("TICKETING_NATS_URL is not set")
        try:
            # Reconnect forever once connected, but do not hang a start on an unreachable URL.
            self.nc = await asyncio.wait_for(
                nats.connect(
                    self.settings.nats_url,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    # A server that stops answering (frozen, or cut off without a reset) is
                    # noticed within some 15 s, not nats-py's 2 minutes of pings: readiness
                    # says so, and the client reconnects.
                    ping_interval=PING_INTERVAL_SECONDS,
                    max_outstanding_pings=2,
                    error_cb=self._on_error,
                ),
                timeout=self.settings.nats_connect_timeout_seconds,
            )
        except TimeoutError:
            raise ConnectionError(f"NATS at {self.settings.nats_url} did not answer") from None
        self._js = self.nc.jetstream()
        await self.ensure_stream()

    async def ensure_stream(self) -> None:
        await ensure_stream(
            self.js,
            name=self.stream,
            prefix=self.prefix,
            replicas=self.settings.nats_stream_replicas,
        )

    @property
    def is_connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def _on_error(self, exc: Exception) -> None:
        # One line per failed try: nats-py's own report is a traceback, twice a second while
        # the server is away (at start, or until it is back).
        log.warning("NATS at %s: %r", _without_credentials(self.settings.nats_url), exc)

    async def close(self) -> None:
        # Listeners settle their own messages and publishes are awaited, so there is nothing
        # in flight to drain; close at once.
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
            self.nc = None


async def ensure_stream(js: JetStreamContext, *, name: str, prefix: str, replicas: int = 1) -> None:
    """Create the stream, or bring an existing one to this configuration; safe to race."""
    config = StreamConfig(
        name=name,
        subjects=[f"{prefix}.>"],
        storage=StorageType.FILE,
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
        num_replicas=replicas,
    )
    try:
        await js.stream_info(name)
    except NotFoundError:
        try:
            await js.add_stream(config)
            return
        except Exception:
            await js.stream_info(name)  # created by a concurrent starter: fine if it exists now
    await js.update_stream(config)


class Publisher:
    """Publishes envelopes; the event id is the Nats-Msg-Id so JetStream drops duplicates."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        # JetStream's acks of sends (send_raw), by the token ending their reply subject, on an
        # inbox of this publisher's (subscribed once per connection).
        self._acks: dict[str, asyncio.Future[None]] = {}
        self._tokens = itertools.count()  # unique within the inbox: no random bytes needed
        self._inbox: str | None = None
        self._inbox_of: NATS | None = None

    async def publish_raw(
        self, event_type: str, event_id: str, body: bytes, *, correlation: str | None = None
    ) -> None:
        await self.bus.js.publish(
            subject_for(event_type, self.bus.prefix),
            body,
            stream=self.bus.stream,
            headers=_publish_headers(event_id, correlation),
        )

    async def publish(self, envelope: Envelope) -> None:
        await self.publish_raw(envelope.type, envelope.id, envelope.model_dump_json().encode())

    async def send_raw(
        self, event_type: str, event_id: str, body: bytes, *, correlation: str | None = None
    ) -> asyncio.Future[None]:
        """Hand a publish to the client and return at once (no turn of the loop is waited
        for, unless the client's buffer is full); JetStream's ack comes to the future.
        Await it through `acked`, which bounds the wait."""
        nc = self.bus.nc
        assert nc is not None, "Bus.connect() first"
        if self._inbox_of is not nc:
            await self._listen_for_acks(nc)
        token = str(next(self._tokens))
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._acks[token] = ack
        ack.add_done_callback(lambda _: self._acks.pop(token, None))
        headers = _publish_headers(event_id, correlation)
        headers[Header.EXPECTED_STREAM] = self.bus.stream
        try:
            await nc.publish(
                subject_for(event_type, self.bus.prefix),
                body,
                reply=f"{self._inbox}.{token}",
                headers=headers,
            )
        except BaseException:
            ack.cancel()
            raise
        return ack

    @staticmethod
    async def acked(sends: Sequence[asyncio.Future[None]]) -> None:
        """Wait for the acks of sends, for at most PUBLISH_ACK_SECONDS (TimeoutError then);
        any send left unanswered is given up."""
        try:
            async with asyncio.timeout(PUBLISH_ACK_SECONDS):
                await asyncio.gather(*sends)
        finally:
            for send in sends:
                send.cancel()  # a no-op on those answered

    async def _listen_for_acks(self, nc: NATS) -> None:
        # Set before the subscription is awaited: a send meanwhile uses the same inbox, its
        # publish queued after the SUB (which the client queues before its first await).
        self._inbox, self._inbox_of = nc.new_inbox(), nc
        try:
            await nc.subscribe(f"{self._inbox}.*", cb=self._on_ack)
        except BaseException:
            self._inbox_of = None
            raise

    async def _on_ack(self, msg: Msg) -> None:
        ack = self._acks.get(msg.subject.rsplit(".", 1)[-1])
        if ack is None or ack.done():
            return  # given up meanwhile
        if msg.headers and msg.headers.get(Header.STATUS) == NO_RESPONDERS_STATUS:
            ack.set_exception(NoStreamResponseError())  # no stream takes the subject
            return
        try:
            answer = json.loads(msg.data)
        except ValueError as exc:
            ack.set_exception(exc)
            return
        if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
            ack.set_exception(_api_error(answer["error"]))
        else:
            ack.set_result(None)


def _api_error(error: dict[str, Any]) -> APIError:
    """The APIError nats-py makes of a JetStream error (its from_error raises it)."""
    try:
        APIError.from_error(error)
    except APIError as exc:
        return exc
    except (KeyError, TypeError):  # not the shape JetStream gives
        pass
    return APIError(description=str(error))


def _publish_headers(event_id: str, correlation: str | None) -> dict[str, str]:
    headers = {"Nats-Msg-Id": event_id}
    if correlation:
        headers[NATS_CORRELATION_HEADER] = correlation
    return headers


def _correlation_of(msg: Msg) -> str | None:
    return (msg.headers or {}).get(NATS_CORRELATION_HEADER)


@contextlib.contextmanager
def _correlated(msg: Msg) -> Iterator[None]:
    """Work for an event runs under the correlation id of the request that caused it, so its
    logs and the events it adds carry it on."""
    token = correlation_id.set(_correlation_of(msg))
    try:
        yield
    finally:
        correlation_id.reset(token)


@dataclass(frozen=True)
class Delivered(Generic[E]):
    """One event of those a batch handler takes at once, with the correlation id of the
    request that caused it (for the events it adds: see write_changed_with_events)."""

    event: E
    correlation: str | None


def consumer_filter(prefix: str, event_types: Iterable[str]) -> str:
    """The narrowest single subject filter (all NATS 2.9 allows) that covers these event
    types. Every event a consumer is sent costs a delivery and an ack, even unread: under load
    most of them would be other services' events."""
    types = set(event_types)
    if len(types) == 1:
        return subject_for(types.pop(), prefix)
    families = {event_type.partition(":")[0] for event_type in types}
    if len(families) == 1:
        return f"{prefix}.{families.pop()}.>"
    return f"{prefix}.>"


def _lane(msg: Msg) -> str:
    """What an event is about: its ticket when it names one, else its order or its own id."""
    try:
        data = json.loads(msg.data).get("data", {})
        ticket = data.get("ticket")
        return str((ticket or {}).get("id") or data.get("id") or data.get("orderId") or "")
    except (ValueError, AttributeError):
        return ""  # undecodable: handle() dead-letters it


class Listener:
    """A service's durable consumer: decode, handle in a transaction, ack after the commit
    (or, for a handler whose effect is outside the database, ack once it has run).

    Every replica of a service pulls from the same durable consumer, so each event reaches one
    replica. A handler that raises RetryLater is redelivered after a delay; one that keeps
    failing is recorded in dead_letters and terminated after `max_deliver` attempts.
    """

    def __init__(
        self,
        *,
        service: str,
        db: Database,
        bus: Bus,
        metrics: ServiceMetrics | None = None,
        max_deliver: int = 5,
        max_retry_later: int = MAX_RETRY_LATER,
        ack_wait: float = 30.0,
        batch: int = 32,
        fetch_window: float = FETCH_WINDOW_SECONDS,
        gather: float = GATHER_SECONDS,
        lanes: int = 8,
    ) -> None:
        self.service = service
        self.db = db
        self.bus = bus
        self.metrics = metrics
        self.max_deliver = max_deliver
        self._failures: dict[str, int] = {}  # event id -> failures so far, in this process
        self.max_retry_later = max_retry_later
        self.ack_wait = ack_wait
        self.batch = batch
        self.fetch_window = fetch_window
        self.gather = gather
        self.handlers: dict[str, Handler] = {}
        # Handlers whose effect is outside this service's database, idempotent on their own.
        self.handlers_outside_db: dict[str, PlainHandler] = {}
        # Of those, the ones that take the events of their type in a batch at once.
        self.batch_handlers: dict[str, BatchHandler] = {}
        self.batch_handlers_outside_db: dict[str, PlainBatchHandler] = {}
        # Lanes in flight at once: each holds a database connection while it handles.
        self._lanes = asyncio.Semaphore(lanes)
        self._task: asyncio.Task[None] | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        self._stopping = False

    def on(
        self, event_cls: type[E]
    ) -> Callable[[Callable[[AsyncSession, E], Awaitable[None]]], Any]:
        """Register the handler of one event type."""

        def register(fn: Callable[[AsyncSession, E], Awaitable[None]]) -> Any:
            self.handlers[event_cls.type] = fn
            return fn

        return register

    def on_outside_db(self, event_cls: type[E]) -> Callable[[Callable[[E], Awaitable[None]]], Any]:
        """Register the handler of one event type whose effect lives elsewhere (a job queue)
        and is idempotent there: no transaction and no inbox entry here, which could not be
        atomic with that effect anyway."""

        def register(fn: Callable[[E], Awaitable[None]]) -> Any:
            self.handlers_outside_db[event_cls.type] = fn
            return fn

        return register

    def on_batch(
        self, event_cls: type[E]
    ) -> Callable[[Callable[[AsyncSession, list[Delivered[E]]], Awaitable[None]]], Any]:
        """Register the handler of one event type that takes several at once: those of a batch
        that come one after another (in stream order), so that it can write them in a few
        statements instead of a few each. An event handled on its own comes as a list of one.
        Several run under no correlation id: the events they add take each Delivered's."""

        def register(fn: Callable[[AsyncSession, list[Delivered[E]]], Awaitable[None]]) -> Any:
            async def one(session: AsyncSession, event: E) -> None:
                await fn(session, [Delivered(event, correlation_id.get())])

            self.batch_handlers[event_cls.type] = fn
            self.handlers[event_cls.type] = one
            return fn

        return register

    def on_batch_outside_db(
        self, event_cls: type[E]
    ) -> Callable[[Callable[[list[Delivered[E]]], Awaitable[None]]], Any]:
        """on_outside_db for a handler that takes every event of its type in a batch at once."""

        def register(fn: Callable[[list[Delivered[E]]], Awaitable[None]]) -> Any:
            async def one(event: E) -> None:
                await fn([Delivered(event, correlation_id.get())])

            self.batch_handlers_outside_db[event_cls.type] = fn
            self.handlers_outside_db[event_cls.type] = one
            return fn

        return register

    @property
    def event_types(self) -> set[str]:
        return {*self.handlers, *self.handlers_outside_db}

    async def start(self) -> None:
        config = ConsumerConfig(
            durable_name=self.service,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            # Our own count decides when a message is dead; the server keeps trying until then.
            max_deliver=-1,
            filter_subject=consumer_filter(self.bus.prefix, self.event_types),
            max_ack_pending=1000,
        )
        self._stopping = False
        self._sub = await self._subscribe(config)
        self._task = asyncio.create_task(self._run(config), name=f"listener-{self.service}")

    async def _subscribe(self, config: ConsumerConfig) -> JetStreamContext.PullSubscription:
        try:
            await self.bus.js.add_consumer(self.bus.stream, config)
        except APIError as exc:
            # A server that cannot change an existing consumer in place: the consumer made by
            # an earlier version still works, only receiving more than it needs. Anything
            # else (no stream, no consumer) must stop the start-up.
            await self.bus.js.consumer_info(self.bus.stream, self.service)
            log.warning("%s keeps its existing consumer: %s", self.service, exc)
        return await self.bus.js.pull_subscribe_bind(durable=self.service, stream=self.bus.stream)

    async def _consumer_exists(self) -> bool:
        try:
            await self.bus.js.consumer_info(self.bus.stream, self.service)
        except NotFoundError:
            return False
        except Exception:  # NATS away: nothing to tell, nothing to make again
            return True
        return True

    async def _bind_again(self, config: ConsumerConfig) -> None:
        """Fetches have failed for a while: NATS may be back without its store (the stream
        and the consumer gone). Make them again; a consumer made again is handed every event
        the stream holds, and the inbox drops those already handled."""
        try:
            await self.bus.ensure_stream()
            sub = await self._subscribe(config)
        except Exception as exc:
            log.warning("%s could not bind its consumer again: %r", self.service, exc)
            return
        old, self._sub = self._sub, sub
        if old is not None:
            with contextlib.suppress(Exception):
                await old.unsubscribe()

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def has_handled(self, event_type: str) -> bool:
        """Whether this service has handled the last `event_type` event on the stream and every
        event of its own before it (acked: its transaction committed), looked at again for up to
        REPLICA_WAIT_SECONDS; False if not by then or if NATS could not tell. What a client was
        told had happened elsewhere, in an answer that waited for its event to be on the
        stream, has then taken effect here."""
        return await self._reached(event_type, "handled", lambda info: info.ack_floor)

    async def has_received(self, event_type: str) -> bool:
        """Whether the last `event_type` event on the stream has been delivered to this service
        (whatever waits for a retry before it), looked at again as in has_handled: False while
        its events are not even coming in, as while its events worker restarts."""
        return await self._reached(event_type, "received", lambda info: info.delivered)

    async def _reached(
        self, event_type: str, what: str, mark: Callable[[ConsumerInfo], SequenceInfo | None]
    ) -> bool:
        if not self.bus.is_connected:
            return False  # NATS is away: no answer to wait for (a request would hang on it)
        try:
            # A bound on the whole: each JetStream request may wait seconds for its answer.
            async with asyncio.timeout(2 * REPLICA_WAIT_SECONDS):
                subject = subject_for(event_type, self.bus.prefix)
                try:
                    last = await self.bus.js.get_last_msg(self.bus.stream, subject)
                except NotFoundError:
                    return True  # never published

                async def reached() -> bool | None:
                    sequence = mark(await self.bus.js.consumer_info(self.bus.stream, self.service))
                    seq = sequence.stream_seq if sequence else None
                    return True if (seq or 0) >= (last.seq or 0) else None

                return bool(await reached() or await replicated(reached))
        except (nats.errors.Error, APIError, TimeoutError) as exc:
            log.warning(
                "%s could not tell whether %s was %s: %r", self.service, event_type, what, exc
            )
            return False

    async def stop(self) -> None:
        # The flag, not only the cancel: on Python 3.11 a fetch can swallow a cancellation
        # that lands as a message arrives, and the loop must still end.
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _run(self, config: ConsumerConfig) -> None:
        failing_since: float | None = None
        quiet_since = time.monotonic()
        while not self._stopping:
            assert self._sub is not None
            try:
                msgs = await self._fetch(self._sub)
            except (TimeoutError, nats.errors.TimeoutError):
                # Nothing came; or the consumer is gone, which a fetch does not tell apart.
                failing_since = None
                if time.monotonic() - quiet_since > BIND_AGAIN_AFTER_SECONDS:
                    quiet_since = time.monotonic()
                    if not await self._consumer_exists():
                        await self._bind_again(config)
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("fetch failed for %s; retrying: %r", self.service, exc)
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > BIND_AGAIN_AFTER_SECONDS:
                    await self._bind_again(config)
                    failing_since = None
                await asyncio.sleep(0.5)
                continue
            failing_since = None
            quiet_since = time.monotonic()
            try:
                await self._settle_batch(msgs)
            except asyncio.CancelledError:
                raise
            except Exception:
                # An ack that failed (NATS went away): unacked, the messages come back and the
                # inbox drops what was already done. The loop must live on.
                log.exception("%s could not settle a batch; it will be redelivered", self.service)
            if len(msgs) < self.batch:
                # Under load, what comes in the next moment shares the next transaction
                # (a transaction per event costs most of a listener's time).
                await asyncio.sleep(self.gather)

    async def _fetch(self, sub: JetStreamContext.PullSubscription) -> list[Msg]:
        """What is ready, at once (JetStream does not wait for the batch to fill); when nothing
        is, the first event within the fetch window; after a quiet window, the next message as
        soon as it comes."""
        try:
            msgs: list[Msg] = await sub.fetch(self.batch, timeout=self.fetch_window)
        except (TimeoutError, nats.errors.TimeoutError):
            msgs = await sub.fetch(1, timeout=1.0)
        return msgs

    async def _settle_batch(self, msgs: list[Msg]) -> None:
        """A batch in one transaction when all of it goes well (the common case: one commit
        instead of one per event), and the events of a handler outside the database that
        takes them together in one call. Otherwise each event on its own, in lanes: events
        about one ticket or order in their order, different ones side by side, so one slow
        transaction does not hold up the rest (handlers already accept any order)."""
        ours: list[Msg] = []
        outside_db: list[Msg] = []
        for msg in msgs:
            event_type = self._type_of(msg)
            if event_type in self.handlers:
                ours.append(msg)
            elif event_type in self.handlers_outside_db:
                outside_db.append(msg)
            else:
                await msg.ack()  # not ours: no need even to decode it
        # SQLite has one writer: keep its transactions short, one event each.
        if len(ours) > 1 and not self.db.is_sqlite and await self._settle_together(ours):
            ours = []
        outside_db = await self._settle_outside_db_together(outside_db)
        lanes: dict[str, list[Msg]] = {}
        for msg in ours + outside_db:
            lanes.setdefault(_lane(msg), []).append(msg)
        await asyncio.gather(*(self._settle_lane(lane) for lane in lanes.values()))

    async def _settle_together(self, msgs: list[Msg]) -> bool:
        """Handle every message in stream order in one transaction, then ack them all. False,
        with nothing committed or acked, if any of them is bad, early or fails: then each is
        handled on its own, and only that one is retried or dead-lettered."""
        deliveries = self._decode_all(msgs, self.handlers)
        if deliveries is None:
            return False
        try:
            firsts = await self._handle_in_one_transaction(deliveries)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("%s handles a batch of %d one by one after %r", self.service, len(msgs), exc)
            return False
        for (msg, envelope, _, _), first in zip(deliveries, firsts, strict=True):
            await self._acked(msg, envelope, first=first)
        return True

    @staticmethod
    def _decode_all(msgs: list[Msg], handlers: Mapping[str, H]) -> list[_Delivery[H]] | None:
        """Every message decoded with its handler; None if any cannot be (handle() settles it)."""
        deliveries: list[_Delivery[H]] = []
        for msg in msgs:
            try:
                envelope = Envelope.model_validate_json(msg.data)
                handler = handlers[envelope.type]
                deliveries.append((msg, envelope, envelope.payload(), handler))
            except (ValidationError, ValueError, KeyError):
                return None
        return deliveries

    async def _handle_in_one_transaction(self, deliveries: list[_Delivery[Handler]]) -> list[bool]:
        """Run each handler this consumer has not run yet; says, per delivery, which ran."""
        firsts: list[bool] = []
        async with self.db.transaction() as session:
            ids = [envelope.id for _, envelope, _, _ in deliveries]
            fresh = await mark_all_handled(session, consumer=self.service, event_ids=ids)
            todo: list[_Delivery[Handler]] = []
            for delivery in deliveries:
                first = delivery[1].id in fresh
                fresh.discard(delivery[1].id)  # the same event twice in a batch: once
                if first:
                    todo.append(delivery)
                firsts.append(first)
            for run in self._runs(todo):
                await self._run_handlers(session, run)
                # Each handler reads fresh rows, as in a transaction of its own: what
                # another process committed meanwhile, not what the batch read before.
                await session.flush()
                session.expire_all()
        return firsts

    def _runs(self, deliveries: list[_Delivery[Handler]]) -> list[list[_Delivery[Handler]]]:
        """Deliveries in stream order, those of a type with a batch handler that come one after
        another together, every other one alone."""
        runs: list[list[_Delivery[Handler]]] = []
        for delivery in deliveries:
            event_type = delivery[1].type
            if runs and event_type in self.batch_handlers and runs[-1][-1][1].type == event_type:
                runs[-1].append(delivery)
            else:
                runs.append([delivery])
        return runs

    async def _run_handlers(self, session: AsyncSession, run: list[_Delivery[Handler]]) -> None:
        if len(run) == 1:
            msg, _, event, handler = run[0]
            await self._run_handler(handler, session, msg, event)
            return
        batch_handler = self.batch_handlers[run[0][1].type]
        await batch_handler(
            session, [Delivered(event, _correlation_of(msg)) for msg, _, event, _ in run]
        )

    async def _settle_outside_db_together(self, msgs: list[Msg]) -> list[Msg]:
        """The events of each type whose handler outside the database takes a batch, in one
        call per type, then acked; returns the rest, and those of a call that failed, to be
        handled one by one (those effects are idempotent, their order free)."""
        left: list[Msg] = []
        by_type: dict[str, list[Msg]] = {}
        for msg in msgs:
            event_type = self._type_of(msg)
            if event_type in self.batch_handlers_outside_db:
                by_type.setdefault(event_type, []).append(msg)
            else:
                left.append(msg)
        for event_type, group in by_type.items():
            handler = self.batch_handlers_outside_db[event_type]
            if len(group) == 1 or not await self._outside_db_together(handler, group):
                left += group
        return left

    async def _outside_db_together(self, handler: PlainBatchHandler, msgs: list[Msg]) -> bool:
        deliveries = self._decode_all(msgs, self.handlers_outside_db)
        if deliveries is None:
            return False
        try:
            await handler(
                [Delivered(event, _correlation_of(msg)) for msg, _, event, _ in deliveries]
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("%s handles %d events one by one after %r", self.service, len(msgs), exc)
            return False
        for msg, envelope, _, _ in deliveries:
            await self._acked(msg, envelope, first=True)
        return True

    @staticmethod
    async def _run_handler(handler: Handler, session: AsyncSession, msg: Msg, event: Event) -> None:
        with _correlated(msg):
            await handler(session, event)

    async def _settle_lane(self, msgs: list[Msg]) -> None:
        async with self._lanes:
            for msg in msgs:
                try:
                    await self.handle(msg)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # Unsettled, the message comes back after ack_wait; the loop must live on.
                    log.exception(
                        "%s could not settle a message; it will be redelivered", self.service
                    )

    def _type_of(self, msg: Msg) -> str:
        """ticketing.ticket.created carries ticket:created."""
        return msg.subject.removeprefix(f"{self.bus.prefix}.").replace(".", ":")

    async def handle(self, msg: Msg) -> None:
        """Handle one delivery and settle it: ack, nak with a delay, or dead-letter."""
        attempt = msg.metadata.num_delivered or 1
        try:
            envelope = Envelope.model_validate_json(msg.data)
        except ValidationError as exc:
            await self._dead(msg, None, f"undecodable message: {exc}", attempt)
            return
        handler = self.handlers.get(envelope.type)
        outside_db = self.handlers_outside_db.get(envelope.type)
        if handler is None and outside_db is None:
            await msg.ack()  # an event this service does not listen to
            return
        try:
            event = envelope.payload()
        except (ValidationError, ValueError) as exc:
            await self._dead(msg, envelope, f"invalid payload: {exc}", attempt)
            return
        if handler is not None:
            run = self._in_transaction(handler, msg, envelope, event)
        elif outside_db is not None:
            run = self._outside_db(outside_db, msg, event)
        await self._dispatch(msg, envelope, run, attempt)

    async def _in_transaction(
        self, handler: Handler, msg: Msg, envelope: Envelope, event: Event
    ) -> bool:
        """Handle with an inbox entry in one transaction; False when it was handled before."""
        async with self.db.transaction() as session:
            first = await mark_handled(session, consumer=self.service, event_id=envelope.id)
            if first:
                await self._run_handler(handler, session, msg, event)
        return first

    @staticmethod
    async def _outside_db(handler: PlainHandler, msg: Msg, event: Event) -> bool:
        with _correlated(msg):
            await handler(event)
        return True

    async def _dispatch(
        self, msg: Msg, envelope: Envelope, run: Awaitable[bool], attempt: int
    ) -> None:
        """Run a delivery's handling and settle the message by how it went."""
        try:
            first = await run
        except (RetryLater, StaleDataError) as retry:
            # Not a failure: the event is early, or a concurrent write won; try again soon.
            await self._later(msg, envelope, retry, attempt)
            return
        except IntegrityError as exc:
            if await self._already_handled(envelope.id):
                first = False
            else:
                await self._failed(msg, envelope, exc, attempt)
                return
        except Exception as exc:
            if not is_unavailable(exc):
                await self._failed(msg, envelope, exc, attempt)
                return
            # A part down (the database, say): the event is fine and waits for it, however
            # long, as an early event waits; it does not use up the attempts of a failure.
            log.warning(
                "%s cannot handle %s %s yet (attempt %d): %r",
                self.service, envelope.type, envelope.id, attempt, exc,
            )  # fmt: skip
            await self._later(msg, envelope, RetryLater(repr(exc), delay=0.2), attempt)
            return
        await self._acked(msg, envelope, first=first)

    async def _later(
        self, msg: Msg, envelope: Envelope, retry: RetryLater | StaleDataError, attempt: int
    ) -> None:
        if attempt >= self.max_retry_later:
            await self._dead(msg, envelope, f"gave up waiting: {retry}", attempt)
            return
        self._count(envelope.type, "retry")
        base = retry.delay if isinstance(retry, RetryLater) else 0.05
        await msg.nak(delay=retry_delay(base, attempt))

    async def _acked(self, msg: Msg, envelope: Envelope, *, first: bool) -> None:
        await msg.ack()
        self._failures.pop(envelope.id, None)
        self._count(envelope.type, "handled" if first else "duplicate")
        lag = (datetime.now(UTC) - envelope.time).total_seconds()
        if self.metrics:
            self.metrics.listener_lag.labels(type=envelope.type).set(lag)
        with _correlated(msg):
            log.info(
                "%s handled %s %s", self.service, envelope.type, envelope.id,
                extra={"event_type": envelope.type, "event_id": envelope.id, "lag_seconds": lag},
            )  # fmt: skip

    async def _already_handled(self, event_id: str) -> bool:
        """Read-only: did a concurrent delivery of this event commit its effect?"""
        async with self.db.sessionmaker() as session:
            return await session.get(InboxEntry, (self.service, event_id)) is not None

    async def _failed(self, msg: Msg, envelope: Envelope, exc: Exception, attempt: int) -> None:
        # Failures are counted apart from deliveries: an event that waited (early, or for a
        # part that was down) has not used up the tries a failing handler gets.
        failures = self._failures.pop(envelope.id, 0) + 1
        if failures >= self.max_deliver:
            await self._dead(msg, envelope, repr(exc), attempt)
            return
        if len(self._failures) >= FAILURES_REMEMBERED:
            del self._failures[next(iter(self._failures))]  # the oldest, long handled elsewhere
        self._failures[envelope.id] = failures
        log.warning(
            "%s failed on %s %s (failure %d of %d): %r",
            self.service, envelope.type, envelope.id, failures, self.max_deliver, exc,
        )  # fmt: skip
        self._count(envelope.type, "failed")
        await msg.nak(delay=min(0.2 * 2**failures, 30.0))

    async def _dead(self, msg: Msg, envelope: Envelope | None, error: str, attempt: int) -> None:
        log.error(
            "%s gives up on %s after %d attempts: %s",
            self.service, envelope.id if envelope else msg.subject, attempt, error,
        )  # fmt: skip
        try:
            async with self.db.transaction() as session:
                session.add(
                    DeadLetter(
                        consumer=self.service,
                        event_id=envelope.id if envelope else None,
                        subject=msg.subject,
                        body=msg.data.decode("utf-8", errors="replace"),
                        error=error[:4000],
                        attempts=attempt,
                    )
                )
        except Exception:
            log.exception("could not record a dead letter; it will be redelivered")
            await msg.nak(delay=5.0)
            return
        self._count(envelope.type if envelope else "unknown", "dead")
        await msg.term()

    def _count(self, event_type: str, outcome: str) -> None:
        if self.metrics:
            self.metrics.events_handled.labels(type=event_type, outcome=outcome).inc()
