"""The database factory on the real database of this run."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
from sqlalchemy import event as sa_event
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from tests.conftest import PG_URL, Infra
from tests.support import eventually
from ticketing.common.db import Database, one_of
from ticketing.common.events import ExpirationComplete
from ticketing.common.outbox import OutboxEvent, add_event, insert_event_once, mark_all_handled
from ticketing.common.settings import Settings


@pytest.fixture
async def one_connection(settings: Settings) -> AsyncIterator[Database]:
    """A service's database whose pool holds one connection: a test knows which one it gets."""
    db = Database(settings.service_database_url("probe"), pool_size=1)
    await db.create_all()
    yield db
    await db.dispose()


@asynccontextmanager
async def _admin() -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(PG_URL.replace("+asyncpg", "") + "/postgres")
    try:
        yield conn
    finally:
        await conn.close()


async def test_creates_the_service_database_and_common_tables(
    settings: Settings, infra: Infra, namespace: str
) -> None:
    db = Database(settings.service_database_url("probe"))
    await db.create_all()
    try:
        async with db.transaction() as session:
            await session.execute(text("SELECT count(*) FROM outbox"))
            await session.execute(text("SELECT count(*) FROM inbox"))
            await session.execute(text("SELECT count(*) FROM dead_letters"))
        if infra.postgres:
            async with _admin() as conn:
                name = await conn.fetchval(
                    "SELECT datname FROM pg_database WHERE datname = $1", f"{namespace}_probe"
                )
            assert name == f"{namespace}_probe"
        else:
            async with db.engine.connect() as conn:
                mode = (await conn.execute(text("PRAGMA journal_mode"))).scalar()
            assert mode == "wal"
    finally:
        await db.dispose()


async def test_create_all_twice_is_harmless(settings: Settings) -> None:
    """A second start keeps what the first one's tables hold."""
    event = ExpirationComplete(order_id="o-1")
    for start in ("first", "second"):
        db = Database(settings.service_database_url("probe"))
        await db.create_all()
        async with db.autocommit() as connection:
            if start == "first":
                await insert_event_once(connection, event, event_id="e-kept")
            kept = await connection.scalar(text("SELECT count(*) FROM outbox"))
        await db.dispose()
        assert kept == 1


async def test_create_all_makes_the_tables_again_when_its_connection_ends_under_it(
    settings: Settings, infra: Infra
) -> None:
    """PostgreSQL restarting while a worker starts: the connection ends before the first table
    is made (its backend terminated, as the server does to every client then); the DDL goes
    again on a new connection, and the worker starts instead of failing its start-up."""
    if not infra.postgres:
        pytest.skip("SQLite has no server to end a connection")
    db = Database(settings.service_database_url("probe"))
    ended: list[str] = []

    @sa_event.listens_for(db.engine.sync_engine, "before_cursor_execute")
    def end_the_connection_once(_conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        if not ended and statement.lstrip().upper().startswith("CREATE TABLE"):
            ended.append(statement)
            with contextlib.suppress(Exception):  # the backend ends under this statement
                cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")

    try:
        await db.create_all()
        assert ended, "no CREATE TABLE ran: the tables were there already"
        async with db.transaction() as session:
            assert (await session.execute(text("SELECT count(*) FROM outbox"))).scalar() == 0
    finally:
        await db.dispose()


async def test_create_all_does_not_retry_what_is_not_a_lost_connection(
    settings: Settings,
) -> None:
    """A failure of the statement itself, on a connection that is fine, is raised at once."""
    db = Database(settings.service_database_url("probe"))
    tries: list[str] = []

    @sa_event.listens_for(db.engine.sync_engine, "before_cursor_execute")
    def fail_the_statement(_conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("CREATE TABLE"):
            tries.append(statement)
            cursor.execute("SELECT * FROM no_such_table")  # the driver's own error

    try:
        with pytest.raises(DBAPIError) as raised:
            await db.create_all()
        assert not raised.value.connection_invalidated
        assert len(tries) == 1
    finally:
        await db.dispose()


async def test_a_plain_transaction_hands_the_relay_only_the_outbox_rows_it_committed(
    one_connection: Database,
) -> None:
    db = one_connection
    commits: list[list[str]] = []
    db.on_commit(lambda rows: commits.append([row["event_id"] for row in rows]))
    event = ExpirationComplete(order_id="o-1")
    with pytest.raises(RuntimeError):
        async with db.plain_transaction() as connection:
            await insert_event_once(connection, event, event_id="e-1")
            raise RuntimeError("the use case failed")
    async with db.plain_transaction() as connection:
        await connection.execute(text("SELECT 1"))  # writes no event
    assert commits == []
    async with db.plain_transaction() as connection:
        await insert_event_once(connection, event, event_id="e-1")
    assert commits == [["e-1"]]
    async with db.transaction() as session:
        stored = await session.scalar(text("SELECT count(*) FROM outbox"))
    assert stored == 1


async def test_a_session_reused_after_a_rollback_hands_on_only_what_it_committed(
    settings: Settings,
) -> None:
    db = Database(settings.service_database_url("probe"))
    await db.create_all()
    handed: list[str] = []
    db.on_commit(lambda rows: handed.extend(row["event_id"] for row in rows))
    try:
        async with db.sessionmaker() as session:
            with pytest.raises(RuntimeError):
                async with session.begin():
                    add_event(session, ExpirationComplete(order_id="o-1"), event_id="rolled-back")
                    raise RuntimeError("the use case failed")
            async with session.begin():
                add_event(session, ExpirationComplete(order_id="o-2"), event_id="committed")
        assert handed == ["committed"]
        async with db.transaction() as session:
            stored = list(await session.scalars(text("SELECT event_id FROM outbox")))
        assert stored == ["committed"]
    finally:
        await db.dispose()


def _outbox_read() -> Any:
    from sqlalchemy import bindparam, select

    from ticketing.common.outbox import OutboxEvent

    columns = OutboxEvent.__table__.c
    return select(columns.event_id, columns.type, columns.created_at, columns.published_at).where(
        columns.event_id == bindparam("event_id"), columns.type != "never"
    )


async def test_read_first_gives_what_a_sqlalchemy_read_gives(one_connection: Database) -> None:
    """Through the driver on PostgreSQL, through SQLAlchemy on SQLite: the same row, aware
    timestamps included, and the literals bound when the statement was built."""
    db, statement = one_connection, _outbox_read()
    async with db.autocommit() as connection:
        await insert_event_once(connection, ExpirationComplete(order_id="o-1"), event_id="e-1")
    for _ in range(3):  # the one pooled connection goes back after each read
        row = await db.read_first(statement, {"event_id": "e-1"})
        async with db.engine.connect() as connection:
            expected = (await connection.execute(statement, {"event_id": "e-1"})).one()
        assert row is not None and dict(row) == dict(expected._mapping)
        assert row["created_at"].utcoffset() is not None
    assert await db.read_first(statement, {"event_id": "missing"}) is None


async def test_read_first_reads_on_a_new_connection_when_the_pooled_one_died(
    one_connection: Database, infra: Infra
) -> None:
    """The server restarted (here: ended the pooled connection's backend): the read is simply
    made again on a new connection, and the dead one is never handed out again."""
    if not infra.postgres:
        pytest.skip("SQLite has no server to drop a connection")
    db, statement = one_connection, _outbox_read()
    for _ in range(3):
        assert await db.read_first(statement, {"event_id": "missing"}) is None
        async with db.engine.connect() as connection:
            pid = (await connection.execute(text("SELECT pg_backend_pid()"))).scalar()
        async with _admin() as admin:
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
        assert await db.read_first(statement, {"event_id": "missing"}) is None


async def test_a_write_on_a_connection_the_server_ended_is_an_outage_not_a_bug(
    one_connection: Database, infra: Infra
) -> None:
    """A rush's winning write loses its connection under it (the backend ended mid-statement):
    it fails as an outage (so the buyer gets a 503, not a 500), and the next write gets a new
    connection."""
    import asyncio

    from sqlalchemy import bindparam, insert, literal_column

    from ticketing.common.db import utcnow
    from ticketing.common.errors import is_unavailable
    from ticketing.common.outbox import InboxEntry

    if not infra.postgres:
        pytest.skip("the write runs through the driver on PostgreSQL only")
    db = one_connection
    statement = insert(InboxEntry).values(
        consumer="probe", event_id=bindparam("event_id"), handled_at=bindparam("at")
    )
    await db.write_on_driver(statement, {"event_id": "e-1", "at": utcnow()})
    slow = insert(InboxEntry).values(
        consumer=literal_column("(SELECT 'probe' FROM pg_sleep(30))"),
        event_id=bindparam("event_id"),
        handled_at=bindparam("at"),
    )
    write = asyncio.create_task(db.write_on_driver(slow, {"event_id": "e-2", "at": utcnow()}))
    async with _admin() as admin:

        async def ended_under_the_write() -> bool:
            return bool(await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
                " WHERE state = 'active' AND query LIKE '%pg_sleep(30)%'"
                " AND pid <> pg_backend_pid()"
            ))  # fmt: skip

        await eventually(ended_under_the_write)
    with pytest.raises(Exception) as failed:
        await write
    assert is_unavailable(failed.value), repr(failed.value)
    await db.write_on_driver(statement, {"event_id": "e-3", "at": utcnow()})
    with pytest.raises(Exception) as refused:  # a caller's bug stays one: not an outage
        await db.write_on_driver(statement, {"event_id": "e-4", "at": "not a time"})
    assert not is_unavailable(refused.value), repr(refused.value)
    async with db.engine.connect() as connection:
        ids = (await connection.execute(text("SELECT event_id FROM inbox ORDER BY 1"))).scalars()
        assert list(ids) == ["e-1", "e-3"]


@pytest.mark.parametrize("other_commits", [False, True])
async def test_a_write_whose_connection_ends_under_it_is_found_out_not_an_outage(
    one_connection: Database, infra: Infra, other_commits: bool
) -> None:
    """A rush's winning order, written with its outbox row, loses its connection while the
    statement waits (here: on another transaction's insert of the same key). Whether it was
    written is found out on another connection, and the write made again if it was not: the
    caller gets the write's own answer (done; or refused, when the other transaction took the
    key), not a 503, and never two rows."""
    import asyncio

    from sqlalchemy.exc import IntegrityError

    from ticketing.common.db import utcnow
    from ticketing.common.outbox import InboxEntry, insert_with_event_on_driver

    if not infra.postgres:
        pytest.skip("the write runs through the driver on PostgreSQL only")
    db = one_connection
    row = {"consumer": "probe", "event_id": "e-1", "handled_at": utcnow()}
    dsn = PG_URL.replace("+asyncpg", "") + f"/{db.engine.url.database}"
    other = await asyncpg.connect(dsn)
    try:
        await other.execute("BEGIN")
        await other.execute("INSERT INTO inbox VALUES ('probe', 'e-1', now())")
        write = asyncio.create_task(
            insert_with_event_on_driver(db, InboxEntry, row, ExpirationComplete(order_id="o"))
        )
        async with _admin() as admin:

            async def ended_while_it_waited() -> bool:
                return bool(await admin.fetchval(
                    "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND query LIKE '%INSERT INTO inbox%'"
                ))  # fmt: skip

            await eventually(ended_while_it_waited)
        await other.execute("COMMIT" if other_commits else "ROLLBACK")
        if other_commits:
            with pytest.raises(IntegrityError):
                await write
        else:
            await write
        stored = await other.fetchval("SELECT count(*) FROM outbox")
        assert stored == (0 if other_commits else 1)
        assert await other.fetchval("SELECT count(*) FROM inbox") == 1
    finally:
        await other.close()


@pytest.fixture
async def pool_of_six(
    settings: Settings, infra: Infra, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Database]:
    """A service's database whose pool holds six connections, two of which the driver's calls
    may keep (PostgreSQL only: on SQLite they go through SQLAlchemy); kept for 2 s without a
    call, so that a slow moment between a test's steps does not hand them back."""
    if not infra.postgres:
        pytest.skip("the driver's calls keep connections on PostgreSQL only")
    monkeypatch.setattr("ticketing.common.db.KEPT_IDLE_SECONDS", 2.0)
    db = Database(settings.service_database_url("probe"), pool_size=6)
    await db.create_all()
    yield db
    await db.dispose()


def _backend_pid() -> Any:
    from sqlalchemy import func

    return select(func.pg_backend_pid().label("pid"))


async def test_the_driver_keeps_its_connection_between_calls_and_gives_it_back_when_quiet(
    pool_of_six: Database,
) -> None:
    """A rush's attempts follow one another on the connection the last one used, checked out
    of the pool once; a quiet spell hands it back."""
    db = pool_of_six
    first = await db.read_first(_backend_pid(), {})
    second = await db.read_first(_backend_pid(), {})
    assert first is not None and second is not None and first["pid"] == second["pid"]
    assert db.engine.pool.checkedout() == 1  # type: ignore[attr-defined]
    await eventually(lambda: db.engine.pool.checkedout() == 0)  # type: ignore[attr-defined]


async def test_the_driver_keeps_a_third_of_the_pool_and_sessions_have_the_rest(
    pool_of_six: Database,
) -> None:
    from sqlalchemy import func

    db = pool_of_six
    slow = select(func.pg_sleep(0.2).label("slept"))
    await asyncio.gather(*(db.read_first(slow, {}) for _ in range(5)))
    assert db.engine.pool.checkedout() == 2  # type: ignore[attr-defined]
    sessions = [await db.engine.connect() for _ in range(4)]  # the rest of the pool, at once
    try:
        for connection in sessions:
            assert (await connection.execute(text("SELECT 1"))).scalar() == 1
    finally:
        for connection in sessions:
            await connection.close()


async def test_kept_connections_go_back_when_the_pool_finds_one_dead(
    pool_of_six: Database,
) -> None:
    """A dead connection may mean the server restarted: the pool then replaces its older
    connections at their next checkout, and the kept ones go back to it for that."""
    db = pool_of_six
    assert await db.read_first(_backend_pid(), {}) is not None
    assert db.engine.pool.checkedout() == 1  # type: ignore[attr-defined]
    async with db.engine.connect() as connection:
        await connection.invalidate()
    assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert await db.read_first(_backend_pid(), {}) is not None


async def test_a_read_cancelled_on_a_kept_connection_leaves_it_unkept(
    pool_of_six: Database,
) -> None:
    """As test_read_first_cancelled_mid_statement_leaves_the_pool_usable, on a connection kept
    from the call before: it is not kept again, and the next read has a good one."""
    from sqlalchemy import bindparam, func

    db = pool_of_six
    assert await db.read_first(_backend_pid(), {}) is not None  # kept now
    read = asyncio.create_task(db.read_first(select(func.pg_sleep(bindparam("s"))), {"s": 30}))
    await eventually(lambda: _running("pg_sleep", database=db.engine.url.database or ""))
    read.cancel()
    with pytest.raises(asyncio.CancelledError):
        await read
    assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert await db.read_first(_outbox_read(), {"event_id": "missing"}) is None


async def test_a_kept_connection_the_server_ended_is_not_read_on(pool_of_six: Database) -> None:
    """PostgreSQL restarted (here: ended the kept connection's backend) between two attempts:
    the next read is made on a new connection, as a pooled one's would be."""
    db = pool_of_six
    for _ in range(3):
        before = await db.read_first(_backend_pid(), {})
        assert before is not None
        async with _admin() as admin:
            await admin.execute("SELECT pg_terminate_backend($1, 5000)", before["pid"])
        after = await db.read_first(_backend_pid(), {})
        assert after is not None and after["pid"] != before["pid"]


async def test_read_first_cancelled_mid_statement_leaves_the_pool_usable(
    one_connection: Database, infra: Infra
) -> None:
    """A request cancelled while its read runs (the buyer went away) must not hand the next
    one a connection whose protocol is still busy."""
    import asyncio

    from sqlalchemy import bindparam, func, select

    if not infra.postgres:
        pytest.skip("the read runs through the driver on PostgreSQL only")
    db = one_connection
    read = asyncio.create_task(db.read_first(select(func.pg_sleep(bindparam("s"))), {"s": 30}))
    await eventually(lambda: _running("pg_sleep", database=db.engine.url.database or ""))
    read.cancel()
    with pytest.raises(asyncio.CancelledError):
        await read
    assert await db.read_first(_outbox_read(), {"event_id": "missing"}) is None


async def _running(fragment: str, *, database: str) -> bool:
    """Whether this test's statement runs (not another worker's, in a database of its own)."""
    async with _admin() as admin:
        found = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE state = 'active' AND datname = $1 AND query LIKE $2",
            database,
            f"%{fragment}%$1%",
        )
    return bool(found)


async def _prepared_like(db: Database, prefix: str) -> int:
    """How many statements starting with `prefix` the one pooled connection has prepared."""
    query = text("SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE :prefix")
    async with db.engine.connect() as connection:
        return int((await connection.execute(query, {"prefix": prefix + "%"})).scalar_one())


async def test_one_of_matches_a_list_of_any_length_in_one_prepared_statement(
    one_connection: Database,
) -> None:
    """A list of any length, empty included, and on PostgreSQL one statement text for all of
    them: prepared once, where an IN list has a text (a statement to prepare) per length."""
    db = one_connection
    async with db.autocommit() as connection:
        for n in range(1, 5):
            await insert_event_once(connection, ExpirationComplete(order_id="o"), event_id=f"e-{n}")
    event_id = OutboxEvent.__table__.c.event_id
    statement = select(event_id).where(one_of(event_id, "event_ids"))
    for ids in ([], ["e-1"], ["e-2", "missing"], ["e-1", "e-2", "e-3", "e-4"]):
        async with db.engine.connect() as connection:
            found = (await connection.execute(statement, {"event_ids": ids})).scalars().all()
        assert sorted(found) == [i for i in ids if i != "missing"]
    if not db.is_sqlite:
        assert await _prepared_like(db, "SELECT outbox.event_id") == 1


async def test_a_batch_is_marked_handled_once_each_in_one_prepared_statement(
    one_connection: Database,
) -> None:
    """The events of a batch not handled before, each once (a repeat within the batch too);
    on PostgreSQL one statement for batches of every size."""
    db = one_connection
    batches = [["a"], ["a", "b"], ["c", "b", "c", "d"], ["e", "f", "g"]]
    new = []
    for batch in batches:
        async with db.transaction() as session:
            new.append(await mark_all_handled(session, consumer="probe", event_ids=batch))
    assert new == [{"a"}, {"b"}, {"c", "d"}, {"e", "f", "g"}]
    if not db.is_sqlite:
        assert await _prepared_like(db, "INSERT INTO inbox") == 1
