from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from ticketing.auth.app import create_app
from ticketing.auth.settings import AuthSettings
from ticketing.platform.embedded import SmtpSink


@pytest.fixture
def auth_settings(settings_kwargs: dict[str, Any], smtp_sink: SmtpSink) -> AuthSettings:
    return AuthSettings(
        **settings_kwargs,
        smtp_url=smtp_sink.url,
        public_url="http://testserver",
        # One fixed window for the whole test: the limits' tests count attempts across it, and
        # a window boundary falling between two attempts would start the count again.
        rate_limit_window_seconds=10**9,
    )


@pytest.fixture
async def auth_app(auth_settings: AuthSettings) -> AsyncIterator[FastAPI]:
    app = create_app(auth_settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
def make_client(auth_app: FastAPI) -> Callable[[], httpx.AsyncClient]:
    """A new browser: its own cookie jar against the same service."""

    def make() -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=auth_app)
        return httpx.AsyncClient(transport=transport, base_url="http://testserver")

    return make


@pytest.fixture
async def client(make_client: Callable[[], httpx.AsyncClient]) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client() as c:
        yield c
