"""Test infrastructure: real PostgreSQL and NATS on 127.0.0.1 when they answer, otherwise
SQLite and the nats-server from the wheel. TICKETING_TEST_INFRA=real|embedded forces a path."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest

from ticketing.common.settings import Settings
from ticketing.platform.embedded import EmbeddedNats, SmtpSink, port_answers

PG_URL = os.environ.get(
    "TICKETING_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432"
)
NATS_URL = os.environ.get("TICKETING_TEST_NATS_URL", "nats://127.0.0.1:4222")


@dataclass(frozen=True)
class Infra:
    kind: str  # "real" or "embedded"
    nats_url: str

    @property
    def postgres(self) -> bool:
        return self.kind == "real"


def _choose_kind() -> str:
    wanted = os.environ.get("TICKETING_TEST_INFRA", "auto")
    if wanted in ("real", "embedded"):
        return wanted
    answers = port_answers("127.0.0.1", 5432) and port_answers("127.0.0.1", 4222)
    return "real" if answers else "embedded"


@pytest.fixture(scope="session")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Infra]:
    kind = _choose_kind()
    if kind == "real":
        yield Infra(kind, NATS_URL)
        return
    server = EmbeddedNats(tmp_path_factory.mktemp("nats"))
    server.start()
    try:
        yield Infra(kind, server.url)
    finally:
        server.stop()


@pytest.fixture
def namespace() -> str:
    """A name of this test's own, for its databases, stream and subjects."""
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
async def settings_kwargs(
    infra: Infra, namespace: str, tmp_path: Path
) -> AsyncIterator[dict[str, Any]]:
    """Settings for one test: its own databases and its own stream on the shared server."""
    if infra.postgres:
        database_url = f"{PG_URL}/{namespace}_{{service}}"
    else:
        database_url = f"sqlite+aiosqlite:///{tmp_path}/{{service}}.db"
    yield {
        "database_url": database_url,
        "nats_url": infra.nats_url,
        "nats_stream": namespace.upper(),
        "nats_subject_prefix": namespace,
        "data_dir": tmp_path,
        "outbox_sweep_seconds": 0.5,
    }
    await _drop_namespace(infra, namespace)


async def _drop_namespace(infra: Infra, namespace: str) -> None:
    nc = await nats.connect(infra.nats_url)
    try:
        await nc.jetstream().delete_stream(namespace.upper())
    except Exception:
        pass  # the test never created it
    finally:
        await nc.close()
    if infra.postgres:
        conn = await asyncpg.connect(PG_URL.replace("+asyncpg", "") + "/postgres")
        try:
            names = await conn.fetch(
                "SELECT datname FROM pg_database WHERE datname LIKE $1", f"{namespace}\\_%"
            )
            for row in names:
                await conn.execute(f'DROP DATABASE IF EXISTS "{row["datname"]}" WITH (FORCE)')
        finally:
            await conn.close()


@pytest.fixture
def settings(settings_kwargs: dict[str, Any]) -> Settings:
    return Settings(**settings_kwargs)


@pytest.fixture
def smtp_sink(tmp_path: Path) -> Iterator[SmtpSink]:
    """A real SMTP server (aiosmtpd) keeping what it receives."""
    sink = SmtpSink(tmp_path / "mailbox")
    sink.start()
    try:
        yield sink
    finally:
        sink.stop()
