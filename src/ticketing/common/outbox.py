"""Transactional outbox and inbox: events are stored with the change that causes them,
published afterwards by a relay, and handled at most once by each consumer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    Index,
    Insert,
    Integer,
    Select,
    String,
    Text,
    Update,
    bindparam,
    delete,
    func,
    insert,
    literal_column,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.dml import ReturningUpdate
from sqlalchemy.sql.selectable import CTE
from sqlalchemy.types import TypeEngine

from ticketing.common.db import (
    Base,
    ConnectionLost,
    Database,
    OutboxRows,
    UtcDateTime,
    insert_ignoring_duplicates,
    note_outbox_row,
    one_of,
    queue_insert,
    utcnow,
    write_queued,
)
from ticketing.common.errors import is_unavailable
from ticketing.common.events import Envelope, Event
from ticketing.common.logs import correlation_id

if TYPE_CHECKING:
    from ticketing.common.messaging import Publisher
    from ticketing.common.metrics import ServiceMetrics

log = logging.getLogger(__name__)

PRUNE_EVERY_SECONDS = 3600.0
# A sweep leaves rows younger than this to the prompt publish of the process that wrote them
# (done within milliseconds as a rule): it would only publish them twice and contend with their
# mark for the rows' locks.
SWEEP_GRACE_SECONDS = 1.0
# A mark is a write of its own (a commit: a flush of PostgreSQL's log). Under load, what goes
# out in the next moment shares it; well within the sweep's grace, so that no sweep takes a row
# that is only waiting for its mark.
MARK_GATHER_SECONDS = 0.1

# What the relay reads of a row: seq, type, event_id, body, correlation_id.
_OutboxRow = tuple[int, str, str, str, str | None]

# Any constant works: each service has a database of its own, so relays of different
# services never contend for it; replicas of one service take turns.
_RELAY_LOCK_KEY = 0x7469636B


class OutboxEvent(Base):
    """An event waiting to be published (published_at is null) or already sent."""

    __tablename__ = "outbox"

    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    event_id: Mapped[str] = mapped_column(String(36), unique=True)
    type: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(UtcDateTime, default=None)
    correlation_id: Mapped[str | None] = mapped_column(String(64), default=None)

    __table_args__ = (
        Index(
            "ix_outbox_pending",
            "seq",
            postgresql_where=published_at.is_(None),
            sqlite_where=published_at.is_(None),
        ),
    )


class InboxEntry(Base):
    """An event a consumer has handled; its presence makes a redelivery a no-op."""

    __tablename__ = "inbox"

    consumer: Mapped[str] = mapped_column(String(64), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    handled_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class DeadLetter(Base):
    """A message a consumer gave up on: kept with its error for a person to look at."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    consumer: Mapped[str] = mapped_column(String(64))
    event_id: Mapped[str | None] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(255))
    body: Mapped[str] = mapped_column(Text)
    error: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


def _aware(moment: datetime | str) -> datetime:
    # An aggregate skips the column type on SQLite and comes back as text.
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def add_event(session: AsyncSession, event: Event, *, event_id: str | None = None) -> Envelope:
    """Store an event in the outbox, in the caller's transaction (written as it commits)."""
    envelope = Envelope.wrap(event, event_id=event_id)
    row = _outbox_row(envelope)
    queue_insert(session, OutboxEvent, row)
    note_outbox_row(session.info, row)
    return envelope


async def insert_event_once(connection: AsyncConnection, event: Event, *, event_id: str) -> bool:
    """Store an event under a given id unless one with that id is stored already, in one
    statement (atomic without a transaction); False if it was there."""
    row = _outbox_row(Envelope.wrap(event, event_id=event_id))
    stored = (await connection.execute(_outbox_insert_once(connection.dialect.name), row)).first()
    if stored is not None:
        note_outbox_row(connection.info, row)
    return stored is not None


@cache
def _outbox_insert_once(dialect: str) -> Insert:
    return insert_ignoring_duplicates(OutboxEvent, dialect).returning(OutboxEvent.seq)


async def insert_with_event(
    connection: AsyncConnection, entity: type[DeclarativeBase], row: dict[str, Any], event: Event
) -> Envelope:
    """Insert `row` (a value for every column of the table) and store `event` in the outbox,
    atomically even without a transaction (`Database.autocommit`): on PostgreSQL one
    statement, the row's insert in a CTE whose failure (a unique index) writes neither;
    elsewhere two statements in the caller's transaction."""
    envelope = Envelope.wrap(event)
    outbox_row = _outbox_row(envelope)
    if connection.dialect.name == "postgresql":
        await connection.execute(_insert_with_outbox_row(entity), {**row, **_prefixed(outbox_row)})
    else:
        await connection.execute(insert(entity), row)
        await connection.execute(insert(OutboxEvent), outbox_row)
    note_outbox_row(connection.info, outbox_row)
    return envelope


async def insert_with_event_on_driver(
    db: Database, entity: type[DeclarativeBase], row: dict[str, Any], event: Event
) -> Envelope:
    """insert_with_event as a write of its own; on PostgreSQL through the driver itself
    (`Database.write_on_driver`): a rush's winning order, its statement's SQLAlchemy layers
    skipped. The outbox row is handed on once the statement has committed it."""
    if db.is_sqlite:
        async with db.autocommit() as connection:
            return await insert_with_event(connection, entity, row, event)
    envelope = Envelope.wrap(event)
    outbox_row = _outbox_row(envelope)
    statement, params = _insert_with_outbox_row(entity), {**row, **_prefixed(outbox_row)}
    try:
        await db.write_on_driver(statement, params)
    except ConnectionLost:
        await _write_if_lost(db, statement, params, envelope.id)
    db.hand_on([outbox_row])
    return envelope


async def _write_if_lost(
    db: Database, statement: Insert, params: dict[str, Any], event_id: str
) -> None:
    """The connection ended under the write (PostgreSQL restarted, a failover): it committed
    or it did not, and its outbox row, written by the same statement, tells which. If it did
    not, the same write once more, on another connection; refused, it may still be ours (the
    first was committing after all), and the row tells again. The caller gets the answer the
    write deserved, not a 503 for a write that was done."""
    if await _stored(db, event_id):
        return
    try:
        await db.write_on_driver(statement, params)
    except IntegrityError:
        if not await _stored(db, event_id):
            raise


async def _stored(db: Database, event_id: str) -> bool:
    return await db.read_first(_outbox_row_of(), {"event_id": event_id}) is not None


@cache
def _outbox_row_of() -> Select[Any]:
    outbox = OutboxEvent.__table__.c
    return select(outbox.event_id).where(outbox.event_id == bindparam("event_id"))


async def update_with_event(
    connection: AsyncConnection, statement: Update, params: dict[str, Any], event: Event
) -> bool:
    """Run a conditional UPDATE of one row (by its key) and, if it changed it, store `event` in
    the outbox, both atomically even without a transaction (see insert_with_event). False if
    nothing matched."""
    return await _update_with_event(connection, statement, params, event, info=connection.info)


async def update_with_event_in(
    session: AsyncSession, statement: Update, params: dict[str, Any], event: Event
) -> bool:
    """update_with_event in a session's transaction, whose commit hands the row on: one
    round trip, where add_event after a plain update costs a second one at the commit."""
    # The events add_event queued before this one are stored first: the outbox keeps the
    # order of the events (a sweep publishes in that order).
    await write_queued(session)
    connection = await session.connection()
    return await _update_with_event(connection, statement, params, event, info=session.info)


async def update_each_with_event_in(
    session: AsyncSession,
    statement: Update,
    changes: Sequence[tuple[dict[str, Any], Event, str | None]],
) -> None:
    """update_with_event_in for several rows, each (its parameters, its event, the correlation
    id the event carries), a statement each: where `write_changed_with_events` cannot run
    (SQLite, whose one writer has no round trips to save). Only for updates that the caller
    knows will each change their row (it holds their locks and has checked them): this does
    not find out which did, and hands every event on at the commit."""
    await write_queued(session)  # as in update_with_event_in: the outbox keeps their order
    connection = await session.connection()
    rows = [
        _outbox_row_correlated(Envelope.wrap(event), correlation)
        for _, event, correlation in changes
    ]
    for params, _, _ in changes:
        await connection.execute(statement, params)
    await connection.execute(insert(OutboxEvent), rows)
    for row in rows:
        note_outbox_row(session.info, row)


def changes_with_events(columns: Mapping[str, type[TypeEngine[Any]]]) -> CTE:
    """A CTE `changes` of the rows handed to `write_changed_with_events`, one array parameter
    per column (unnest): the given columns of each change, then its event's outbox row
    (event_id, type, body, correlation_id) and its place among them (ord). For a statement
    that changes several rows at once and writes the events of only those it changed, in one
    round trip where reading first what to change costs another."""
    arrays = {**columns, **_EVENT_ARRAYS}
    # Named apart from every column: SQLAlchemy takes a parameter named as a column of an
    # UPDATE's table for a value to SET it to.
    unnested = func.unnest(
        *(bindparam(f"{_CHANGES}{name}", type_=ARRAY(kind)) for name, kind in arrays.items())
    )
    table = unnested.table_valued(*arrays, with_ordinality="ord").render_derived()
    return select(table).cte("changes")


_CHANGES = "changes_"
_EVENT_ARRAYS: dict[str, type[TypeEngine[Any]]] = {
    "event_id": String,
    "type": String,
    "body": Text,
    "correlation_id": String,
}


def events_of_changed(changes: CTE, changed: CTE) -> Insert:
    """The INSERT into the outbox of the events of the `changes` whose event_id `changed` (a
    data-modifying CTE over them) returns, in the changes' order; returns the event ids."""
    outbox = OutboxEvent.__table__.c
    rows = (
        select(
            changes.c.event_id,
            changes.c.type,
            changes.c.body,
            bindparam(f"{_CHANGES}created_at", type_=UtcDateTime),
            changes.c.correlation_id,
        )
        .where(changes.c.event_id.in_(select(changed.c.event_id)))
        .order_by(changes.c.ord)  # the outbox's seq in the changes' order: nextval after a sort
    )
    names = ["event_id", "type", "body", "created_at", "correlation_id"]
    return insert(OutboxEvent).from_select(names, rows).returning(outbox.event_id)


async def write_changed_with_events(
    session: AsyncSession,
    statement: Insert,
    changes: Sequence[tuple[dict[str, Any], Event, str | None]],
) -> set[str]:
    """Run a statement built on `changes_with_events` and `events_of_changed` for these
    changes, each (its columns, its event, the correlation id the event carries), in the
    session's transaction; the events written are handed on at the commit. Returns their
    ids. PostgreSQL only."""
    if not changes:
        return set()
    await write_queued(session)  # as in update_with_event_in: the outbox keeps their order
    connection = await session.connection()
    rows = [_outbox_row_correlated(Envelope.wrap(event), corr) for _, event, corr in changes]
    params: dict[str, Any] = {f"{_CHANGES}{name}": [] for name in changes[0][0]}
    for columns, _, _ in changes:
        for name, value in columns.items():
            params[f"{_CHANGES}{name}"].append(value)
    for name in _EVENT_ARRAYS:
        params[f"{_CHANGES}{name}"] = [row[name] for row in rows]
    params[f"{_CHANGES}created_at"] = utcnow()
    written = set((await connection.execute(statement, params)).scalars())
    for row in rows:
        if row["event_id"] in written:
            note_outbox_row(session.info, row)
    return written


async def _update_with_event(
    connection: AsyncConnection,
    statement: Update,
    params: dict[str, Any],
    event: Event,
    *,
    info: dict[Any, Any],
) -> bool:
    # `info` is where the commit that ends the transaction looks for the rows it wrote: the
    # session's, or the connection's (a pooled connection's info outlives a session on it).
    envelope = Envelope.wrap(event)
    outbox_row = _outbox_row(envelope)
    if connection.dialect.name == "postgresql":
        written = _update_with_outbox_row(statement)
        result = await connection.execute(written, {**params, **_prefixed(outbox_row)})
        changed = result.first() is not None
    else:
        changed = (await connection.execute(statement, params)).rowcount == 1
        if changed:
            await connection.execute(insert(OutboxEvent), outbox_row)
    if changed:
        note_outbox_row(info, outbox_row)
    return changed


_OUTBOX_PARAM = "outbox_"


def _prefixed(outbox_row: dict[str, Any]) -> dict[str, Any]:
    # The outbox's parameters, apart from the row's own (both tables may have a column `id`).
    return {f"{_OUTBOX_PARAM}{key}": value for key, value in outbox_row.items()}


@cache
def _insert_with_outbox_row(entity: type[DeclarativeBase]) -> Insert:
    """WITH written AS (INSERT INTO entity ... RETURNING 1) INSERT INTO outbox SELECT ... FROM
    written: the outbox row exists exactly when the entity's row does."""
    table = entity.__table__
    written = (
        insert(entity)
        .values({column.name: bindparam(column.name, type_=column.type) for column in table.c})
        .returning(literal_column("1"))
        .cte("written")
    )
    return _outbox_row_from(written)


@cache
def _update_with_outbox_row(statement: Update) -> Insert:
    """As above for an UPDATE of one row: the outbox row is written when the update changed
    the row; says whether it wrote it."""
    written = statement.returning(literal_column("1")).cte("written")
    return _outbox_row_from(written).returning(OutboxEvent.seq)


def _outbox_row_from(written: CTE) -> Insert:
    outbox = OutboxEvent.__table__.c
    columns = [outbox[name] for name in _OUTBOX_COLUMNS]
    values = [bindparam(f"{_OUTBOX_PARAM}{column.name}", type_=column.type) for column in columns]
    return insert(OutboxEvent).from_select(columns, select(*values).select_from(written))


_OUTBOX_COLUMNS = ("event_id", "type", "body", "created_at", "published_at", "correlation_id")


def _outbox_row(envelope: Envelope) -> dict[str, Any]:
    """The row of an event, with the correlation id of the work under way."""
    return _outbox_row_correlated(envelope, correlation_id.get())


def _outbox_row_correlated(envelope: Envelope, correlation: str | None) -> dict[str, Any]:
    return {
        "event_id": envelope.id,
        "type": envelope.type,
        "body": envelope.model_dump_json(),
        "created_at": utcnow(),
        "published_at": None,
        "correlation_id": correlation,
    }


async def mark_handled(session: AsyncSession, *, consumer: str, event_id: str) -> bool:
    """Record that `consumer` handled `event_id`; False when it already had."""
    return bool(await mark_all_handled(session, consumer=consumer, event_ids=[event_id]))


async def mark_all_handled(
    session: AsyncSession, *, consumer: str, event_ids: list[str]
) -> set[str]:
    """Record that `consumer` handled these events; returns those it had not handled before.

    One statement for a whole batch, first in its transaction. A concurrent duplicate waits on
    the key until the first commits, then finds it taken (or takes it, if the first rolled
    back)."""
    connection = await session.connection()  # plain SQL: no ORM bookkeeping on a hot path
    now = utcnow()
    if connection.dialect.name == "postgresql":
        listed = {"consumer": consumer, "event_ids": event_ids, "handled_at": now}
        result = await connection.execute(_inbox_insert_listed(), listed)
    else:
        rows = [{"consumer": consumer, "event_id": e, "handled_at": now} for e in event_ids]
        result = await connection.execute(_inbox_insert_rows(), rows)
    return set(result.scalars())


@cache
def _inbox_insert_rows() -> Insert:
    """On SQLite, built once and given its rows as parameters: a statement with its values
    inline would differ by batch size and be compiled again for almost every batch."""
    return insert_ignoring_duplicates(InboxEntry, "sqlite").returning(InboxEntry.event_id)


@cache
def _inbox_insert_listed() -> Insert:
    """On PostgreSQL, a batch's ids as one array: rows given as parameters are sent as a
    statement of as many VALUES as rows, a text (so a statement to prepare) per batch size."""
    inbox = InboxEntry.__table__.c
    event_ids = func.unnest(bindparam("event_ids", type_=ARRAY(inbox.event_id.type)))
    consumer = bindparam("consumer", type_=inbox.consumer.type)
    rows = select(consumer, event_ids, bindparam("handled_at", type_=inbox.handled_at.type))
    return (
        insert_ignoring_duplicates(InboxEntry, "postgresql")
        .from_select(["consumer", "event_id", "handled_at"], rows)
        .returning(inbox.event_id)
    )


class OutboxRelay:
    """Publishes outbox rows: those a commit of this process wrote, at once (and marks them
    published afterwards); and, on a sweep, in order, every row still pending, whoever wrote it
    (a publish that failed, a process that died before it published).

    A row may so go out twice (a sweep that meets a row whose prompt publish is under way): it
    keeps its Nats-Msg-Id, and JetStream drops the copy. Events of one service published by
    different processes may interleave; every consumer takes events in any order (versions)."""

    def __init__(
        self,
        db: Database,
        publisher: Publisher,
        *,
        metrics: ServiceMetrics | None = None,
        sweep_seconds: float = 2.0,
        batch_size: int = 200,
        retention_seconds: float = 7 * 24 * 3600,
        mark_gather_seconds: float = MARK_GATHER_SECONDS,
    ) -> None:
        self.db = db
        self.publisher = publisher
        self.metrics = metrics
        self.sweep_seconds = sweep_seconds
        # An inbox entry only matters while its event can still be redelivered: a week is far
        # beyond any ack wait or retry schedule.
        self.retention_seconds = retention_seconds
        self._next_observe = 0.0
        self._next_prune = 0.0
        self.batch_size = batch_size
        self.mark_gather_seconds = mark_gather_seconds
        # Set until started and once stopped; a flag as well as the cancellation (see
        # Listener.stop: a cancellation alone may be swallowed), and it ends a sweep's wait.
        self._stopped = asyncio.Event()
        self._stopped.set()
        self._fresh = _Handoff()  # rows committed here, to publish
        self._sent = _Handoff()  # rows published at once, to mark
        # Rows handed over by this process's commits, and those of them whose prompt publish is
        # over (sent, or failed and left to a sweep): caught_up compares the two.
        self._handed = 0
        self._settled = 0
        self._awaiting: set[asyncio.Task[None]] = set()  # acks of rounds sent
        self._progress = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []
        db.on_commit(self._committed)

    def start(self, *, sweep: bool = True) -> None:
        """Publish this process's commits from now on and, with `sweep`, every pending row."""
        self._stopped.clear()
        self._tasks = [
            asyncio.create_task(self._publish_fresh(), name="outbox-publish"),
            asyncio.create_task(self._mark_sent(), name="outbox-mark"),
        ]
        if sweep:
            self._tasks.append(asyncio.create_task(self._run(), name="outbox-sweep"))

    async def stop(self) -> None:
        # Rows not yet published or marked stay pending: the next sweep anywhere sends them.
        self._stopped.set()
        for task in [*self._tasks, *self._awaiting]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        async with self._progress:  # what was handed over is the sweep's now: nobody waits
            self._settled = self._handed
            self._progress.notify_all()

    def _committed(self, rows: OutboxRows) -> None:
        if not self._stopped.is_set():  # else nothing would take them: a sweep will
            self._handed += len(rows)
            self._fresh.add(rows)

    async def caught_up(self, *, within: float) -> bool:
        """Wait until every event this process has committed so far is on the stream (or its
        publish failed and a sweep will send it), for at most `within` seconds."""
        target = self._handed
        try:
            async with asyncio.timeout(within), self._progress:
                await self._progress.wait_for(
                    lambda: self._settled >= target or self._stopped.is_set()
                )
        except TimeoutError:
            return False
        return True

    async def send_committed(self) -> None:
        """Send what this process has committed and not yet sent, now, in the caller's task;
        the relay awaits JetStream's acks. A request that waits for its event to be on its
        way (a rush's winning order) so waits for no turn of a busy loop: not for the relay's
        task to wake, nor for the ack."""
        rows = self._fresh.take_now()
        if rows:
            await self._send_round(rows)

    async def _publish_fresh(self) -> None:
        """Rows of this process's commits, in commit order, as soon as they commit: what
        committed meanwhile goes in the same round (in batches, after a stall). A round is
        sent without waiting for the acks of the one before: they are awaited apart."""
        while not self._stopped.is_set():
            await self._send_round(await self._fresh.take())

    async def _send_round(self, rows: OutboxRows) -> None:
        for batch in self._batches(rows):
            try:
                sends = await self._send_all(batch)
            except Exception:
                log.warning("could not publish %d events; the sweep will", len(batch),
                            exc_info=True)  # fmt: skip
                await self._settle(len(batch))
                continue
            task = asyncio.create_task(self._acks(batch, sends), name="outbox-acks")
            self._awaiting.add(task)
            task.add_done_callback(self._awaiting.discard)

    async def _send_all(self, rows: Sequence[Mapping[Any, Any]]) -> list[asyncio.Future[None]]:
        """Every row handed to NATS, in row order (so the stream keeps the outbox's order);
        their acks to come. If one cannot be, those already handed are given up (a sweep sends
        them again, Nats-Msg-Id dropping the copies) and the error raised."""
        sends: list[asyncio.Future[None]] = []
        try:
            for row in rows:
                body = row["body"].encode()
                correlation = row["correlation_id"]
                sends.append(
                    await self.publisher.send_raw(
                        row["type"], row["event_id"], body, correlation=correlation
                    )
                )
        except BaseException:
            for send in sends:
                send.cancel()
            raise
        return sends

    async def _acks(self, rows: OutboxRows, sends: list[asyncio.Future[None]]) -> None:
        try:
            await self.publisher.acked(sends)
        except Exception:
            # Left pending: a sweep publishes them again, and JetStream drops any copy.
            log.warning("no ack for %d events; the sweep will send them", len(rows), exc_info=True)
        else:
            self._sent.add(rows)
            self._count_published(rows)
        await self._settle(len(rows))

    async def _settle(self, settled: int) -> None:
        async with self._progress:
            self._settled += settled
            self._progress.notify_all()

    async def _mark_sent(self) -> None:
        """Mark what went out, off the path of the next publish; one statement per batch."""
        while not self._stopped.is_set():
            for rows in self._batches(await self._sent.take(gather=self.mark_gather_seconds)):
                try:
                    await self._mark_published(rows)
                except Exception:
                    # Still pending, so swept and published again: JetStream drops the copies.
                    log.warning("could not mark %d events published", len(rows), exc_info=True)

    async def _mark_published(self, rows: Sequence[Mapping[Any, Any]]) -> None:
        params = {"event_ids": [row["event_id"] for row in rows], "now": utcnow()}
        async with self.db.autocommit() as connection:  # one statement: no BEGIN, no COMMIT
            await connection.execute(_mark_published_events(), params)

    def _batches(self, rows: OutboxRows) -> list[OutboxRows]:
        # A statement's parameters and a client's send buffer are bounded; a round after a
        # stall is not.
        return [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]

    async def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                while await self.publish_pending() == self.batch_size:
                    pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not is_unavailable(exc):
                    log.exception("outbox relay failed; retrying on the next sweep")
                else:  # the database or NATS away (a restart, say): no bug to trace
                    log.warning("outbox sweep: a part is not answering (%r); again later", exc)
            await self._housekeeping()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), self.sweep_seconds)

    async def _housekeeping(self) -> None:
        """Backlog metrics once a sweep, pruning once an hour; never on every commit."""
        now = time.monotonic()
        try:
            if now >= self._next_observe:
                self._next_observe = now + self.sweep_seconds
                await self._observe_backlog()
            if now >= self._next_prune:
                self._next_prune = now + PRUNE_EVERY_SECONDS
                await self.prune()
        except Exception as exc:
            # A traceback only for what is wrong in the work; the database away is an outage.
            trace = not is_unavailable(exc)
            log.warning("outbox housekeeping failed (%r); trying again later", exc, exc_info=trace)

    async def prune(self) -> None:
        """Forget published events and handled ids older than the retention."""
        cutoff = utcnow() - timedelta(seconds=self.retention_seconds)
        async with self.db.transaction() as session:
            await session.execute(
                delete(OutboxEvent).where(
                    OutboxEvent.published_at.is_not(None), OutboxEvent.published_at < cutoff
                )
            )
            await session.execute(delete(InboxEntry).where(InboxEntry.handled_at < cutoff))

    async def _observe_backlog(self) -> None:
        if self.metrics is None:
            return
        async with self.db.sessionmaker() as session:
            count, oldest = (
                await session.execute(
                    select(func.count(), func.min(OutboxEvent.created_at)).where(
                        OutboxEvent.published_at.is_(None)
                    )
                )
            ).one()
        self.metrics.outbox_backlog.set(count or 0)
        age = (utcnow() - _aware(oldest)).total_seconds() if oldest else 0.0
        self.metrics.outbox_oldest_age.set(max(age, 0.0))

    async def publish_pending(self) -> int:
        """Publish one batch of pending rows; returns how many went out."""
        if self.db.is_sqlite:
            return await self._publish_in_short_transactions()
        async with self.db.engine.begin() as connection:
            # One sweep at a time keeps the order.
            await connection.execute(_relay_lock())
            # Marked and read in one statement; if a publish fails, the rollback unmarks them.
            claimed = await connection.execute(_claim_pending(), self._sweep_params())
            rows = sorted(claimed.all(), key=lambda row: row.seq)
            await self._publish([row._mapping for row in rows])
        return len(rows)

    def _sweep_params(self) -> dict[str, Any]:
        now = utcnow()
        before = now - timedelta(seconds=SWEEP_GRACE_SECONDS)
        return {"limit": self.batch_size, "now": now, "before": before}

    async def _publish_in_short_transactions(self) -> int:
        # SQLite has one writer: never hold its lock while waiting on NATS. Publishing before
        # marking is safe: a row published twice has the same Nats-Msg-Id.
        async with self.db.engine.begin() as connection:
            result = await connection.execute(_pending_rows(), self._sweep_params())
            rows = [row._mapping for row in result.all()]
        await self._publish(rows)
        if rows:
            await self._mark_published(rows)
        return len(rows)

    async def _publish(self, rows: Sequence[Mapping[Any, Any]]) -> None:
        # All of a batch on the wire at once, acks awaited together: one round trip, not one per
        # row. If any publish fails, none is marked and the whole batch goes again.
        await self.publisher.acked(await self._send_all(rows))
        self._count_published(rows)

    def _count_published(self, rows: Sequence[Mapping[Any, Any]]) -> None:
        if self.metrics:
            for row in rows:
                self.metrics.events_published.labels(type=row["type"]).inc()


class _Handoff:
    """Rows handed from one side (a commit hook, which cannot await) to a task that takes
    everything handed over since its last turn."""

    def __init__(self) -> None:
        self._rows: OutboxRows = []
        self._ready = asyncio.Event()

    def add(self, rows: OutboxRows) -> None:
        self._rows.extend(rows)
        self._ready.set()

    def take_now(self) -> OutboxRows:
        """Everything handed over and not yet taken, without waiting."""
        self._ready.clear()
        rows, self._rows = self._rows, []
        return rows

    async def take(self, *, gather: float = 0.0) -> OutboxRows:
        """Wait for rows; then `gather` seconds more, for those that follow, before taking."""
        await self._ready.wait()
        if gather:
            await asyncio.sleep(gather)
        return self.take_now()


@cache
def _pending_rows() -> Select[_OutboxRow]:
    table = OutboxEvent.__table__.c
    return (
        select(table.seq, table.type, table.event_id, table.body, table.correlation_id)
        .where(table.published_at.is_(None), table.created_at < bindparam("before"))
        .order_by(table.seq)
        .limit(bindparam("limit"))
    )


@cache
def _relay_lock() -> Select[Any]:
    return select(func.pg_advisory_xact_lock(_RELAY_LOCK_KEY))


@cache
def _claim_pending() -> ReturningUpdate[_OutboxRow]:
    table = OutboxEvent.__table__.c
    pending = (
        select(table.seq)
        .where(table.published_at.is_(None), table.created_at < bindparam("before"))
        .order_by(table.seq)
        .limit(bindparam("limit"))
        # A row whose mark holds its lock was just published: not the sweep's.
        .with_for_update(skip_locked=True)
    )
    return (
        update(OutboxEvent)
        .where(table.seq.in_(pending))
        .values(published_at=bindparam("now"))
        .returning(table.seq, table.type, table.event_id, table.body, table.correlation_id)
    )


@cache
def _mark_published_events() -> Update:
    table = OutboxEvent.__table__.c
    return (
        update(OutboxEvent)
        .where(
            one_of(table.event_id, "event_ids"),
            table.published_at.is_(None),
        )
        .values(published_at=bindparam("now"))
    )
