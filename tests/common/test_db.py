"""The database factory on the real database of this run."""

from __future__ import annotations

import asyncpg
from sqlalchemy import text

from tests.conftest import PG_URL, Infra
from ticketing.common.db import Database
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
