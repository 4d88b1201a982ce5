"""Schema migrations with Alembic: one history per service, each with its own version table."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import MetaData

from ticketing.common import outbox  # noqa: F401 - defines the common tables on Base
from ticketing.common.db import Base, ensure_database

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
    command.upgrade(config, revision)


def new_revision(config: Config, message: str) -> None:
    """Autogenerate a revision from the difference between the models and the database."""
    asyncio.run(ensure_database(config.attributes["url"]))
    command.revision(config, message=message, autogenerate=True)
