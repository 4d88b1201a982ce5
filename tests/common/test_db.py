"""The database factory on the real database of this run."""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy import text

from tests.conftest import PG_URL, Infra
from ticketing.common.db import Database
from ticketing.common.events import ExpirationComplete
from ticketing.common.outbox import add_event, insert_event_once
from ticketing.common.settings import Settings


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
            conn = await asyncpg.connect(PG_URL.replace("+asyncpg", "") + "/postgres")
            try:
                name = await conn.fetchval(
                    "SELECT datname FROM pg_database WHERE datname = $1", f"{namespace}_probe"
                )
            finally:
                await conn.close()
            assert name == f"{namespace}_probe"
        else:
            async with db.engine.connect() as conn:
                mode = (await conn.execute(text("PRAGMA journal_mode"))).scalar()
            assert mode == "wal"
    finally:
        await db.dispose()


async def test_create_all_twice_is_harmless(settings: Settings) -> None:
    for _ in range(2):
        db = Database(settings.service_database_url("probe"))
        await db.create_all()
        await db.dispose()


async def test_a_plain_transaction_hands_the_relay_only_the_outbox_rows_it_committed(
    settings: Settings,
) -> None:
    db = Database(settings.service_database_url("probe"), pool_size=1)  # one pooled connection
    await db.create_all()
    commits: list[list[str]] = []
    db.on_commit(lambda rows: commits.append([row["event_id"] for row in rows]))
    event = ExpirationComplete(order_id="o-1")
    try:
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
    finally:
        await db.dispose()


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
