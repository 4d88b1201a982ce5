"""The database factory: one engine per service, created from the settings, never at import."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import cache
from itertools import groupby
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from sqlalchemy import (
    ColumnElement,
    DateTime,
    Insert,
    MetaData,
    Select,
    TypeDecorator,
    any_,
    bindparam,
    event,
    insert,
    inspect,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import DisconnectionError, IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Session
from sqlalchemy.orm.exc import StaleDataError
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.schema import CreateColumn
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.sqltypes import NullType
from sqlalchemy.sql.visitors import InternalTraversal

from ticketing.common.errors import Conflict, is_unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")
# Between the tries of a write that lost a race: at most this long times the try's number.
RETRY_PAUSE_SECONDS = 0.01
CREATE_ATTEMPTS = 8
CREATE_PAUSE_SECONDS = 0.25  # times the attempt: 7 s in all
LOST_EVERY_RACE = "Changed by someone else at the same moment; please try again"


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite hands back naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are ambiguous; use an aware UTC datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def next_version(current: int | None) -> int:
    """Versions start at 0 and go up by one on every change; a stale write fails at flush."""
    return 0 if current is None else current + 1


class Base(DeclarativeBase):
    """Tables that every service keeps in its own database (outbox, inbox, dead letters)."""


POOL_SIZE = 10
# Of a pool's connections, how many the driver's own calls may keep between them (a third),
# and for how long a quiet spell before they go back.
KEPT_SHARE = 3
KEPT_IDLE_SECONDS = 0.5
# The outbox rows a transaction wrote, listed in its session's or connection's info until it
# commits; then they go to the commit hooks (the relay publishes them at once).
OUTBOX_WRITTEN = "outbox_written"
OutboxRows = list[dict[str, Any]]
CommitHook = Callable[[OutboxRows], None]


def note_outbox_row(info: dict[Any, Any], row: dict[str, Any]) -> None:
    """Record in a session's or connection's info that its transaction wrote this outbox row."""
    info.setdefault(OUTBOX_WRITTEN, []).append(row)


def add_missing_columns(connection: Any, metadata: MetaData) -> None:
    """create_all makes missing tables only: add what a table of the models has and the
    database's lacks. Only nullable columns can be added to rows that exist; anything else
    needs a migration (`ticketing migrate`) or a fresh data dir."""
    inspector = inspect(connection)
    for table in metadata.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable:
                raise RuntimeError(
                    f"table {table.name} lacks column {column.name}, which cannot be added to "
                    "existing rows: run `ticketing migrate`, or start on a fresh data dir"
                )
            ddl = CreateColumn(column).compile(dialect=connection.dialect)
            connection.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {ddl}"))
            log.info("added column %s.%s to an older table", table.name, column.name)


class Database:
    """A service's engine and session factory, plus hooks run after a commit."""

    def __init__(
        self, url: str, *, metadata: Sequence[MetaData] = (), pool_size: int = POOL_SIZE
    ) -> None:
        self.url = url
        self.metadata = [Base.metadata, *metadata]
        self.is_sqlite = make_url(url).get_backend_name() == "sqlite"
        self.engine: AsyncEngine = _make_engine(url, is_sqlite=self.is_sqlite, pool_size=pool_size)
        self._kept = KeptConnections(pool_size // KEPT_SHARE, KEPT_IDLE_SECONDS)
        if not self.is_sqlite:
            # A connection found dead may mean the server restarted: the pool then replaces
            # the older connections at their next checkout, which kept ones would skip.
            event.listen(self.engine.sync_engine.pool, "invalidate", self._kept.release_all)
        # A session class of its own, so the commit hook sees only this database's sessions.
        sync_class = type("ServiceSession", (Session,), {})
        self.sessionmaker = async_sessionmaker(
            self.engine, expire_on_commit=False, sync_session_class=sync_class
        )
        self._after_commit: list[CommitHook] = []
        event.listen(sync_class, "before_commit", _insert_queued)
        event.listen(sync_class, "after_rollback", _forget_queued)
        event.listen(sync_class, "after_commit", self._committed)

    def on_commit(self, hook: CommitHook) -> None:
        """Call `hook` with the outbox rows a transaction wrote, once it has committed."""
        self._after_commit.append(hook)

    def _committed(self, session: Any) -> None:
        self.hand_on(session.info.pop(OUTBOX_WRITTEN, None))

    def hand_on(self, rows: OutboxRows | None) -> None:
        """Give the hooks the outbox rows a commit wrote (those of a block, or of a write on
        the driver)."""
        if not rows:
            return
        for hook in self._after_commit:
            hook(rows)

    async def create_all(self) -> None:
        """Create the database if it is missing, then every table of this service, and add the
        columns a newer version of a table has (dev: a data dir kept across an upgrade).

        On PostgreSQL, again after a pause while the server is away or restarting (a refused
        connection, one ended under the DDL, "the database system is starting up"): the DDL
        is one transaction, rolled back with its connection, and a worker that gave up here
        would be started again from scratch, to meet the same moment."""
        attempts = 1 if self.is_sqlite else CREATE_ATTEMPTS
        for attempt in range(1, attempts + 1):
            try:
                await ensure_database(self.url)
                async with self.engine.begin() as conn:
                    for md in self.metadata:
                        await conn.run_sync(md.create_all)
                        await conn.run_sync(add_missing_columns, md)
                return
            except Exception as exc:
                if attempt == attempts or not is_unavailable(exc):
                    raise
                log.warning("creating the tables: PostgreSQL is away (%r); again", exc)
                await asyncio.sleep(CREATE_PAUSE_SECONDS * attempt)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session whose work commits when the block ends and rolls back on an error."""
        async with self.sessionmaker() as session, session.begin():
            yield session

    @asynccontextmanager
    async def plain_transaction(self) -> AsyncIterator[AsyncConnection]:
        """A connection without an ORM session, in a transaction that commits when the block
        ends: for the hottest paths, where a session's bookkeeping costs more than the SQL."""
        async with self.engine.begin() as connection:
            try:
                yield connection
            except BaseException:
                # The noted rows live with the pooled connection: clear them, but let nothing
                # from a broken connection hide the error that is on its way out.
                with contextlib.suppress(Exception):
                    connection.info.pop(OUTBOX_WRITTEN, None)
                raise
            # Read here: once the block ends, the connection is committed and back in the pool.
            written = connection.info.pop(OUTBOX_WRITTEN, None)
        self.hand_on(written)

    @asynccontextmanager
    async def autocommit(self) -> AsyncIterator[AsyncConnection]:
        """A connection on which each statement commits by itself, for work whose every write
        is one atomic statement (`insert_with_event`): no BEGIN and no COMMIT or ROLLBACK
        round trips, and a read that decides to write nothing costs one round trip.

        SQLite has one writer and no round trips to save: there the block is one transaction."""
        if self.is_sqlite:
            async with self.plain_transaction() as connection:
                yield connection
            return
        async with self.engine.connect() as connection:
            await connection.execution_options(isolation_level="AUTOCOMMIT")
            written = None
            try:
                yield connection
            finally:
                # Every statement committed as it ran, those before an error included: their
                # rows go to the hooks either way. A broken connection must not hide that error.
                with contextlib.suppress(Exception):
                    written = connection.info.pop(OUTBOX_WRITTEN, None)
                self.hand_on(written)

    async def read_first(
        self, statement: Select[Any], params: dict[str, Any]
    ) -> Mapping[str, Any] | None:
        """The first row of a read that needs no transaction, as a mapping (None if none).

        On PostgreSQL the statement (compiled once) runs through the driver itself on a pooled
        connection: for the hottest read, every attempt of a rush, where SQLAlchemy's
        connection and execution layers cost more than the driver's own call. Values go to the
        driver as they are and come back as it decodes them: plain columns only (no
        TypeDecorator runs; asyncpg's timestamps are already aware)."""
        if self.is_sqlite:
            async with self.engine.connect() as connection:
                row = (await connection.execute(statement, params)).first()
            return None if row is None else row._mapping
        sql, args = _driver_call(statement, self.engine.dialect, params)
        # A read changes nothing, so a connection found dead (the server restarted since it was
        # pooled) costs a retry on the next one, not an error: each pooled one may be dead.
        for _ in range(self.engine.pool.size()):  # type: ignore[attr-defined]
            try:
                return await self._read_once(sql, args)
            except ConnectionLost:
                log.warning("a pooled connection was dead; reading on another", exc_info=True)
        return await self._read_once(sql, args)

    async def write_on_driver(self, statement: Insert, params: dict[str, Any]) -> None:
        """One write that commits by itself, through the driver on a pooled connection as
        read_first reads: for the hottest write, a rush's winning order (with its outbox row, in
        one statement). Values go to the driver as they are, as in read_first. A constraint's
        refusal comes as SQLAlchemy's IntegrityError, as from any other statement. PostgreSQL
        only: SQLite writes through `autocommit`."""
        assert not self.is_sqlite, "SQLite writes through autocommit()"
        sql, args = _driver_call(statement, self.engine.dialect, params)
        try:
            async with self._on_driver() as driver:
                await driver.execute(sql, *args)
        except asyncpg.IntegrityConstraintViolationError as exc:
            raise IntegrityError(sql, args, exc) from exc

    async def _read_once(self, sql: str, args: list[Any]) -> Mapping[str, Any] | None:
        async with self._on_driver() as driver:
            record: Mapping[str, Any] | None = await driver.fetchrow(sql, *args)
        return record

    @asynccontextmanager
    async def _on_driver(self) -> AsyncIterator[asyncpg.Connection]:
        """The driver's own connection of a pooled one, kept for the next call or back to the
        pool when the block ends (`KeptConnections`). A dropped connection, or one cancelled
        mid-statement (its protocol then still busy), must be neither: after any failure but a
        constraint's refusal the next checkout opens a new one. The statements are fixed, so a
        failure is rare and almost always the connection; one the server closed is raised as
        ConnectionLost, an outage as SQLAlchemy reports it of its own connections."""
        pooled = self._kept.take() or await self.engine.raw_connection()
        try:
            yield pooled.driver_connection
        except asyncpg.IntegrityConstraintViolationError:
            self._kept.give_back(pooled)
            raise  # the statement's answer: the connection is as good as before
        except _DEAD_CONNECTION as exc:
            pooled.invalidate()
            raise ConnectionLost(None, None, exc, connection_invalidated=True) from exc
        except BaseException:
            pooled.invalidate()
            raise
        self._kept.give_back(pooled)

    async def retrying(
        self,
        work: Callable[[AsyncSession], Awaitable[T]],
        *,
        attempts: int = 8,
        retry_on: tuple[type[Exception], ...] = (StaleDataError,),
    ) -> T:
        """Run `work` in a transaction, again from the start when a concurrent write won; after
        a pause at random, growing with each try, so that writers who collided do not collide
        again in step. One that loses every time is told so (409), not given a 500."""
        for attempt in range(1, attempts + 1):
            try:
                async with self.transaction() as session:
                    return await work(session)
            except retry_on:
                if attempt == attempts:
                    raise Conflict(LOST_EVERY_RACE) from None
                await asyncio.sleep(random.uniform(0, RETRY_PAUSE_SECONDS * attempt))
        raise AssertionError("unreachable")

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        self._kept.close()
        await self.engine.dispose()


class KeptConnections:
    """Pooled connections the driver's own calls (`Database.read_first`, `write_on_driver`)
    keep checked out between them, for a rush's every attempt: a checkout from SQLAlchemy's
    pool and its return (a greenlet, the pool's events and bookkeeping) cost about as much CPU
    as the attempt's statement. At most `size` idle ones are kept, so that the rest of the pool
    is left to the sessions and to calls beyond them; all go back after `idle_seconds` without
    a call, and at once when the pool finds a connection dead."""

    def __init__(self, size: int, idle_seconds: float) -> None:
        self.size = size
        self.idle_seconds = idle_seconds
        self._connections: list[PoolProxiedConnection] = []
        self._last_use = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def take(self) -> PoolProxiedConnection | None:
        """The connection used last, or None when none is kept."""
        while self._connections:
            pooled = self._connections.pop()
            driver = pooled.driver_connection
            if driver is not None and not driver.is_closed():
                return pooled
            pooled.invalidate()  # the server closed it while kept: as _refuse_closed would
        return None

    def give_back(self, pooled: PoolProxiedConnection) -> None:
        """After a call that left the connection as good as before."""
        if self._closed or len(self._connections) >= self.size:
            pooled.close()  # back to the pool
            return
        self._connections.append(pooled)
        self._last_use = time.monotonic()
        loop = asyncio.get_running_loop()
        if self._timer is None or self._timer_loop is not loop:  # none, or one of a past loop
            self._timer, self._timer_loop = loop.call_later(self.idle_seconds, self._expire), loop

    def _expire(self) -> None:
        quiet = time.monotonic() - self._last_use
        if quiet < self.idle_seconds:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.idle_seconds - quiet, self._expire)
            return
        self._timer = None
        self.release_all()

    def release_all(self, *_event: Any) -> None:
        """Every kept connection back to the pool (also the pool's `invalidate` listener)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._connections:
            self._connections.pop().close()

    def close(self) -> None:
        """Back to the pool for good: a call still running gives its connection back to it."""
        self._closed = True
        self.release_all()


class _OneOf(ColumnElement[Any]):
    """`column` is one of the values bound to `name`, a list of any length.

    On PostgreSQL `column = ANY(:name)`, the list bound as one array: the statement's text is
    the same for any length, so the driver prepares it once per connection. An IN list (as
    `in_` with an expanding parameter writes it) has a text of its own for every length: a
    batch's lists, of every length from one up, filled the prepared-statement cache and sent
    a statement to be prepared again, an extra round trip, again and again. Elsewhere (SQLite,
    which has no arrays), that IN list."""

    inherit_cache = True
    type = NullType()  # no "= 1" after it where booleans are integers (SQLite)
    _traverse_internals = [
        ("column", InternalTraversal.dp_clauseelement),
        ("name", InternalTraversal.dp_string),
    ]

    def __init__(self, column: ColumnElement[Any], name: str) -> None:
        self.column = column
        self.name = name


def one_of(column: ColumnElement[Any], name: str) -> _OneOf:
    """`column` is one of the list bound to `name` (see _OneOf for why)."""
    return _OneOf(column, name)


@compiles(_OneOf)
def _one_of_in_list(element: _OneOf, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.column.in_(bindparam(element.name, expanding=True)), **kw)


@compiles(_OneOf, "postgresql")
def _one_of_array(element: _OneOf, compiler: SQLCompiler, **kw: Any) -> str:
    values = bindparam(element.name, type_=postgresql.ARRAY(element.column.type))
    return compiler.process(element.column == any_(values), **kw)


@cache
def insert_ignoring_duplicates(entity: type[DeclarativeBase], dialect: str) -> Insert:
    """INSERT that skips a row whose key is taken (PostgreSQL and SQLite spell it alike)."""
    dialect_insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return dialect_insert(entity).on_conflict_do_nothing()


_QUEUED = "queued_inserts"


def queue_insert(session: AsyncSession, entity: type[DeclarativeBase], row: dict[str, Any]) -> None:
    """Insert `row` into `entity`'s table as the session commits, after rows queued before it.

    For append-only rows written on hot paths (the outbox): one plain statement at commit
    instead of an ORM object for the unit of work to track and flush."""
    session.info.setdefault(_QUEUED, []).append((entity, row))


async def write_queued(session: AsyncSession) -> None:
    """Insert now what `queue_insert` has queued in this session, if anything: before a row
    is written straight to one of those tables, so that the rows keep the order they came in."""
    if session.info.get(_QUEUED):
        await session.run_sync(_insert_queued)


def _insert_queued(session: Session) -> None:
    queued: list[tuple[type[DeclarativeBase], dict[str, Any]]] = session.info.pop(_QUEUED, [])
    # Consecutive rows of one table go in one statement, in the order they were queued.
    for entity, group in groupby(queued, key=lambda item: item[0]):
        session.connection().execute(insert(entity), [row for _entity, row in group])


def _forget_queued(session: Session) -> None:
    # What the rolled-back transaction queued and wrote is gone: none of it may reach a hook.
    session.info.pop(_QUEUED, None)
    session.info.pop(OUTBOX_WRITTEN, None)


class ConnectionLost(OperationalError):
    """A statement on the driver's own connection met a connection the server had closed."""


# What asyncpg raises on a connection the server closed: closed as it was used, or caught
# between its last statement and the server's notice that it is going away.
_DEAD_CONNECTION = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.InternalClientError,
)


def _driver_call(
    statement: Select[Any] | Insert, dialect: Dialect, params: dict[str, Any]
) -> tuple[str, list[Any]]:
    """A statement's SQL for the driver and its arguments in order: each from `params`, else the
    value bound when the statement was built. One with neither is a mistake, not a NULL (as
    SQLAlchemy would refuse it too)."""
    sql, names, defaults = _compiled_for_driver(statement, dialect)
    missing = [name for name in names if name not in params and defaults.get(name) is None]
    if missing:
        raise KeyError(f"no value for {', '.join(missing)}")
    return sql, [params[name] if name in params else defaults[name] for name in names]


@cache
def _compiled_for_driver(
    statement: Select[Any] | Insert, dialect: Dialect
) -> tuple[str, tuple[str, ...], dict[str, Any]]:
    """A statement's SQL in the driver's own placeholders ($1, $2...), its parameters' names in
    that order, and the values bound when it was built (literals such as a status)."""
    compiled = statement.compile(dialect=dialect)
    return str(compiled), tuple(compiled.positiontup or ()), compiled.params


def _make_engine(url: str, *, is_sqlite: bool, pool_size: int) -> AsyncEngine:
    if not is_sqlite:
        # No pre-ping: it costs a round trip on every checkout. A connection the server closed
        # while it was pooled (a restart, a failover) is known closed to the driver, and is
        # replaced at checkout (_refuse_closed); one that dies under its statement fails it
        # (the caller sees a 503, then recovery).
        # No overflow: an overflow connection is opened and closed per use (a PostgreSQL backend
        # started and stopped), which under load costs far more than waiting for a pooled one.
        engine = create_async_engine(url, pool_size=pool_size, max_overflow=0)
        event.listen(engine.sync_engine.pool, "checkout", _refuse_closed)
        return engine
    engine = create_async_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine.sync_engine, "connect")
    def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
        # Autocommit at the driver level so that the BEGIN below is the only transaction start.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin_immediate(conn: Any) -> None:
        # Take the write lock up front: a deferred transaction that later writes can fail with
        # "database is locked" instead of waiting its turn.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _refuse_closed(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """A pooled connection the server has closed meanwhile (its driver read the end, a local
    check, no round trip) is never handed out: the pool opens another in its place. Nothing
    was sent on it, so nothing is lost; without this, the first statement on each would fail
    (a 503 in every process after each restart of PostgreSQL)."""
    if dbapi_connection.driver_connection.is_closed():
        raise DisconnectionError("closed by the server while pooled")


async def ensure_database(url: str) -> None:
    """Create a PostgreSQL database (or the SQLite file's folder) when it does not exist yet."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        return
    name = parsed.database
    admin = parsed.set(drivername="postgresql", database="postgres")
    conn = await asyncpg.connect(admin.render_as_string(hide_password=False))
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
                log.info("created database %s", name)
            except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
                pass  # another replica created it first
    finally:
        await conn.close()
