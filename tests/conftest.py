"""Test infrastructure: real PostgreSQL and NATS on 127.0.0.1 when they answer, otherwise
SQLite and the nats-server from the wheel. TICKETING_TEST_INFRA=real|embedded forces a path."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nats
import pytest
from fastapi import FastAPI

from tests.support import Running
from ticketing.common.app import Runtime
from ticketing.common.auth import COOKIE_NAME, issue_token
from ticketing.common.settings import Settings
from ticketing.platform.embedded import EmbeddedNats, EmbeddedRedis, SmtpSink, port_answers
from ticketing.platform.gateway import Gateway
from ticketing.platform.services import SERVICES
from ticketing.platform.stripe_sandbox import SandboxServer

PG_URL = os.environ.get(
    "TICKETING_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432"
)
NATS_URL = os.environ.get("TICKETING_TEST_NATS_URL", "nats://127.0.0.1:4222")
REDIS_URL = os.environ.get("TICKETING_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@dataclass(frozen=True)
class Infra:
    kind: str  # "real" or "embedded"
    nats_url: str
    redis_url: str

    @property
    def postgres(self) -> bool:
        return self.kind == "real"


def _choose_kind() -> str:
    wanted = os.environ.get("TICKETING_TEST_INFRA", "auto")
    if wanted in ("real", "embedded"):
        return wanted
    answers = all(port_answers("127.0.0.1", port) for port in (5432, 4222, 6379))
    return "real" if answers else "embedded"


@pytest.fixture(scope="session")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Infra]:
    kind = _choose_kind()
    if kind == "real":
        yield Infra(kind, NATS_URL, REDIS_URL)
        return
    nats_server = EmbeddedNats(tmp_path_factory.mktemp("nats"))
    redis_server = EmbeddedRedis(tmp_path_factory.mktemp("valkey"))
    nats_server.start()
    redis_server.start()
    try:
        yield Infra(kind, nats_server.url, redis_server.url)
    finally:
        nats_server.stop()
        redis_server.stop()


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
        "redis_url": infra.redis_url,
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


class Platform:
    """Services of this test running in process, behind the same gateway `ticketing up` uses."""

    def __init__(self, settings_kwargs: dict[str, Any]) -> None:
        self.settings_kwargs = settings_kwargs
        self.settings = Settings(**settings_kwargs)
        self.apps: dict[str, FastAPI] = {}
        self._stacks: dict[str, AsyncExitStack] = {}

    async def start(self, *names: str, **overrides: Any) -> None:
        for name in names:
            app = SERVICES[name].create_app(**{**self.settings_kwargs, **overrides})
            stack = AsyncExitStack()
            await stack.enter_async_context(app.router.lifespan_context(app))
            self.apps[name] = app
            self._stacks[name] = stack

    async def stop(self, name: str) -> None:
        await self._stacks.pop(name).aclose()
        del self.apps[name]

    async def stop_all(self) -> None:
        for name in list(self._stacks):
            await self.stop(name)

    def runtime(self, name: str) -> Runtime:
        runtime: Runtime = self.apps[name].state.runtime
        return runtime

    def client(self, user_id: str | None = None) -> httpx.AsyncClient:
        """A browser; signed in as `user_id` when one is given."""
        routes = [(SERVICES[name].prefix, app) for name, app in self.apps.items()]
        gateway = Gateway(routes, self.apps)
        transport = httpx.ASGITransport(app=gateway)
        client = httpx.AsyncClient(transport=transport, base_url="http://testserver")
        if user_id is not None:
            token = issue_token(self.settings, user_id=user_id, email=f"{user_id[:8]}@test.com")
            client.cookies.set(COOKIE_NAME, token)
        return client


@pytest.fixture
async def platform(settings_kwargs: dict[str, Any]) -> AsyncIterator[Platform]:
    started = Platform(settings_kwargs)
    yield started
    await started.stop_all()


def new_user() -> str:
    return str(uuid.uuid4())


WEBHOOK_SECRET = "whsec_test_secret_for_the_suite"


@pytest.fixture
async def sandbox() -> AsyncIterator[SandboxServer]:
    """The local Stripe-compatible sandbox, over real HTTP."""
    server = SandboxServer()
    await server.start()
    yield server
    await server.stop()


def payments_settings(sandbox: SandboxServer) -> dict[str, Any]:
    return {
        "stripe_secret_key": "sk_test_sandbox",
        "stripe_api_base": sandbox.url,
        "stripe_webhook_secret": WEBHOOK_SECRET,
    }


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Any]:
    """Start `ticketing` commands; whatever is still running at the end is killed."""
    started: list[Running] = []

    def run(*args: str, env: dict[str, str]) -> Running:
        proc = Running(list(args), env, tmp_path / f"out-{len(started)}.log")
        started.append(proc)
        return proc

    yield run
    for proc in started:
        if proc.process.poll() is None:
            proc.process.kill()
            proc.process.wait()
