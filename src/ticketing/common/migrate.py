"""Schema migrations with Alembic: one history per service, each with its own version table."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, inspect, text
from sqlalchemy.ext.asyncio import create_async_engine

from ticketing.common import outbox  # noqa: F401 - defines the common tables on Base
from ticketing.common.db import Base, Database, add_missing_columns, ensure_database

ENV_DIR = Path(__file__).parent / "alembic"


def alembic_config(
    service: str, *, url: str, metadata: Sequence[MetaData], versions: Path
) -> Config:
    """An Alembic config for one service: shared env.py, the service's own versions folder."""
    config = Config()
    config.set_main_option("script_location", str(ENV_DIR))
    config.set_main_option("version_locations", str(versions))
    config.set_main_option("path_separator", "os")
    config.attributes["url"] = url
    config.attributes["metadata"] = [Base.metadata, *metadata]
    config.attributes["version_table"] = f"alembic_version_{service}"
    return config


def upgrade(config: Config, revision: str = "head") -> None:
    """Create the database if needed, then migrate it to `revision`. Call outside an event loop."""
    asyncio.run(ensure_database(config.attributes["url"]))
    if asyncio.run(_made_by_create_all(config)):
        # `ticketing up` (dev) made these tables from the models, which the migrations test
        # keeps equal to head, perhaps models older than head's: bring them level with the
        # models (the columns since), then record head instead of creating them again.
        asyncio.run(_level_with_the_models(config))
        command.stamp(config, "head")
    command.upgrade(config, revision)


async def _level_with_the_models(config: Config) -> None:
    engine = create_async_engine(config.attributes["url"])
    try:
        async with engine.begin() as conn:
            for metadata in config.attributes["metadata"]:
                await conn.run_sync(add_missing_columns, metadata)
    finally:
        await engine.dispose()


async def _made_by_create_all(config: Config) -> bool:
    """Every model table exists and Alembic's version table does not."""
    engine = create_async_engine(config.attributes["url"])
    try:
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
    finally:
        await engine.dispose()
    wanted = {t for md in config.attributes["metadata"] for t in md.tables}
    return config.attributes["version_table"] not in tables and wanted <= tables


def new_revision(config: Config, message: str) -> None:
    """Autogenerate a revision from the difference between the models and the database."""
    asyncio.run(ensure_database(config.attributes["url"]))
    command.revision(config, message=message, autogenerate=True)


class SchemaAtHead:
    """A readiness check: the service's database is not behind its newest migration.
    Production migrates in a Job of its own (`ticketing migrate`), and a process started before
    that Job finished would answer with errors from tables that are missing or old. A schema
    ahead (a revision this code does not know, from the release being rolled out) is ready:
    migrations are written for the code before them to live with."""

    def __init__(self, db: Database, service: str, versions: Path) -> None:
        self.db = db
        self.version_table = f"alembic_version_{service}"
        self.versions = versions
        self._history: tuple[str | None, set[str]] | None = None
        self._at_head = False  # once there, for good: a schema does not go back

    async def __call__(self) -> None:
        if self._at_head:
            return
        if self._history is None:  # the migration files, read once
            self._history = _history(self.versions)
        head, known = self._history
        async with self.db.engine.connect() as connection:
            stamped = await connection.scalar(
                text(f'SELECT version_num FROM "{self.version_table}"')
            )
        if stamped != head and (stamped is None or stamped in known):
            raise LookupError(f"the schema is at {stamped}, behind {head}")
        self._at_head = True


def _history(versions: Path) -> tuple[str | None, set[str]]:
    """The head revision of a service's migrations, and every revision they hold."""
    config = Config()
    config.set_main_option("script_location", str(ENV_DIR))
    config.set_main_option("version_locations", str(versions))
    config.set_main_option("path_separator", "os")
    script = ScriptDirectory.from_config(config)
    return script.get_current_head(), {r.revision for r in script.walk_revisions()}
