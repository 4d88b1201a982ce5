from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import Integer, String, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ticketing.common.db import Database
from ticketing.common.messaging import Bus, Listener, Publisher
from ticketing.common.metrics import ServiceMetrics
from ticketing.common.settings import Settings


class ProbeBase(DeclarativeBase):
    pass


class Effect(ProbeBase):
    """One row per effect a handler had: duplicates would show as extra rows."""

    __tablename__ = "effects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(64))
    replica: Mapped[str] = mapped_column(String(32), default="")


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[Database]:
    database = Database(settings.service_database_url("probe"), metadata=[ProbeBase.metadata])
    await database.create_all()
    yield database
    await database.dispose()


@pytest.fixture
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    b = Bus(settings)
    await b.connect()
    yield b
    await b.close()


@pytest.fixture
def publisher(bus: Bus) -> Publisher:
    return Publisher(bus)


@pytest.fixture
async def make_listener(
    db: Database, bus: Bus
) -> AsyncIterator[Callable[..., Awaitable[Listener]]]:
    started: list[Listener] = []

    async def make(
        setup: Callable[[Listener], None], *, service: str = "probe", **kwargs: Any
    ) -> Listener:
        listener = Listener(
            service=service, db=db, bus=bus, metrics=ServiceMetrics(service), **kwargs
        )
        setup(listener)
        await listener.start()
        started.append(listener)
        return listener

    yield make
    for listener in started:
        await listener.stop()


async def effects(db: Database) -> list[Effect]:
    async with db.transaction() as session:
        return list(await session.scalars(select(Effect).order_by(Effect.id)))


async def count_effects(db: Database) -> int:
    async with db.transaction() as session:
        return int(await session.scalar(select(func.count()).select_from(Effect)) or 0)
