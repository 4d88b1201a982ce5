"""Alembic: every service's history, from an empty database to head, gives the models' schema."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, inspect, text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.support import eventually
from ticketing.common.db import ensure_database
from ticketing.common.migrate import upgrade
from ticketing.common.settings import Settings
from ticketing.platform.services import SERVICES

WITH_DATABASE = [name for name, spec in SERVICES.items() if spec.has_database]


@pytest.mark.parametrize("service", WITH_DATABASE)
async def test_upgrade_from_empty_to_head_matches_the_models(
    settings: Settings, service: str
) -> None:
    spec = SERVICES[service]
    url = settings.service_database_url(service)
    config = spec.alembic_config(url)
    await asyncio.to_thread(upgrade, config)
    metadata: list[MetaData] = config.attributes["metadata"]
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            diff = await conn.run_sync(lambda c: _diff(c, metadata))
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
    finally:
        await engine.dispose()
    assert diff == []
    assert {"outbox", "inbox", "dead_letters", f"alembic_version_{service}"} <= tables


def _diff(connection: Any, metadata: list[MetaData]) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    # Alembic's own version table is not in the models, by design.
    return [
        d
        for d in compare_metadata(context, metadata)
        if not (d[0] == "remove_table" and d[1].name.startswith("alembic_version_"))
    ]


async def test_upgrading_twice_is_harmless(settings: Settings) -> None:
    url = settings.service_database_url("orders")
    config = SERVICES["orders"].alembic_config(url)
    await asyncio.to_thread(upgrade, config)
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(_KEPT_ROW)
    finally:
        await engine.dispose()
    await asyncio.to_thread(upgrade, config)
    assert await _kept_row_and_revision(url, "alembic_version_orders") == (1, _head(config))


@pytest.mark.parametrize("service", WITH_DATABASE)
async def test_every_history_goes_down_to_empty_and_up_again(
    settings: Settings, service: str
) -> None:
    from alembic import command

    url = settings.service_database_url(service)
    config = SERVICES[service].alembic_config(url)
    await asyncio.to_thread(upgrade, config)
    await asyncio.to_thread(command.downgrade, config, "base")
    assert await _tables(url) <= {f"alembic_version_{service}"}
    await asyncio.to_thread(upgrade, config)
    assert "outbox" in await _tables(url)


async def _tables(url: str) -> set[str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await engine.dispose()


async def test_a_database_made_by_ticketing_up_is_adopted_not_recreated(
    settings: Settings,
) -> None:
    from ticketing.common.db import Database

    spec = SERVICES["tickets"]
    url = settings.service_database_url("tickets")
    db = Database(url, metadata=spec.metadata())
    await db.create_all()  # what a dev start does
    async with db.transaction() as session:
        await session.execute(_KEPT_ROW)
    await db.dispose()
    config = spec.alembic_config(url)
    await asyncio.to_thread(upgrade, config)
    assert await _kept_row_and_revision(url, "alembic_version_tickets") == (1, _head(config))


# A row written before an upgrade, which the upgrade must leave where it is.
_KEPT_ROW = text(
    "INSERT INTO inbox (consumer, event_id, handled_at) VALUES ('kept', 'e-1', :at)"
).bindparams(at=datetime(2026, 1, 1, tzinfo=UTC))


async def _kept_row_and_revision(url: str, version_table: str) -> tuple[int, str | None]:
    """How many rows written before an upgrade are still there, and the revision stamped."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            kept = await conn.scalar(text("SELECT count(*) FROM inbox WHERE consumer = 'kept'"))
            revision = await conn.scalar(text(f"SELECT version_num FROM {version_table}"))
    finally:
        await engine.dispose()
    return int(kept or 0), revision


def _head(config: Any) -> str | None:
    return ScriptDirectory.from_config(config).get_current_head()


# Added to the orders table by the orders service's revision e3a1c9d2b7f4.
NEWER_ORDER_COLUMNS = ("price", "held", "paid")


async def _orders_table_from_before(url: str) -> None:
    """The orders tables as a dev start of the version before those columns left them."""
    from ticketing.common.db import Database

    db = Database(url, metadata=SERVICES["orders"].metadata())
    await db.create_all()
    async with db.engine.begin() as conn:
        for column in NEWER_ORDER_COLUMNS:
            await conn.execute(text(f"ALTER TABLE orders DROP COLUMN {column}"))
    await db.dispose()


async def _order_columns(url: str) -> set[str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            columns = await conn.run_sync(lambda c: inspect(c).get_columns("orders"))
    finally:
        await engine.dispose()
    return {column["name"] for column in columns}


@pytest.mark.parametrize("by", ["a dev start", "ticketing migrate"])
async def test_a_dev_database_from_before_a_new_column_gets_it(settings: Settings, by: str) -> None:
    from ticketing.common.db import Database

    url = settings.service_database_url("orders")
    await _orders_table_from_before(url)
    assert not set(NEWER_ORDER_COLUMNS) & await _order_columns(url)
    if by == "a dev start":
        db = Database(url, metadata=SERVICES["orders"].metadata())
        await db.create_all()
        await db.dispose()
    else:
        config = SERVICES["orders"].alembic_config(url)
        await asyncio.to_thread(upgrade, config)
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                diff = await conn.run_sync(lambda c: _diff(c, config.attributes["metadata"]))
        finally:
            await engine.dispose()
        assert diff == []  # stamped at head, and it is head
    assert set(NEWER_ORDER_COLUMNS) <= await _order_columns(url)


async def test_production_is_ready_only_once_its_schema_is_at_head(
    settings_kwargs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Production migrates in a Job of its own: a process started before it has finished gets
    no traffic, and takes no events, which would fail on tables missing or old."""
    import httpx

    from ticketing.common import app as app_module

    monkeypatch.setattr(app_module, "SCHEMA_POLL_SECONDS", 0.05)
    spec = SERVICES["tickets"]
    app = spec.create_app(**settings_kwargs, env="production", jwt_key="k" * 40)
    url = app.state.runtime.db.engine.url.render_as_string(hide_password=False)
    await ensure_database(url)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            before = await c.get("/readyz")
            await asyncio.to_thread(upgrade, spec.alembic_config(url), _first_revision(spec))
            behind = await c.get("/readyz")
            assert not app.state.runtime.listener.is_running
            await asyncio.to_thread(upgrade, spec.alembic_config(url))
            await eventually(lambda: app.state.runtime.listener.is_running)
            at_head = await c.get("/readyz")
            # The next release has migrated (a revision this code does not know): still ready.
            await _stamp(url, "alembic_version_tickets", "f00dcafe0000")
            ahead = await c.get("/readyz")
    assert (before.status_code, before.json()["schema"], before.json()["listener"]) == (
        503, "down", "down"
    )  # fmt: skip
    assert (behind.status_code, behind.json()["schema"]) == (503, "down")
    assert (at_head.status_code, at_head.json()["schema"]) == (200, "ok")
    assert (ahead.status_code, ahead.json()["schema"]) == (200, "ok")


def _first_revision(spec: Any) -> str:
    script = ScriptDirectory.from_config(spec.alembic_config("sqlite://"))
    [first] = [r.revision for r in script.walk_revisions() if r.down_revision is None]
    return first


async def _stamp(url: str, version_table: str, revision: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text(f"UPDATE {version_table} SET version_num = :r"), {"r": revision}
            )
    finally:
        await engine.dispose()
