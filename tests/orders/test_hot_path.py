"""POST /api/orders answered by OrderAttempts gives what the FastAPI route gives, case by case."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any
from uuid import uuid4

import httpx
import pytest
from fastapi import FastAPI

from tests.conftest import Platform, new_user
from tests.orders.test_routes import seed_ticket
from ticketing.common.app import create_service_app
from ticketing.common.auth import COOKIE_NAME, issue_token
from ticketing.orders import listeners
from ticketing.orders.hot_path import OrderAttempts
from ticketing.orders.models import OrdersBase
from ticketing.orders.routes import router
from ticketing.orders.settings import OrdersSettings
from ticketing.platform.embedded import free_port


@pytest.fixture
async def route_only(platform: Platform) -> AsyncIterator[FastAPI]:
    """The orders app as it would be without OrderAttempts, on the same database."""
    await platform.start("orders")
    app = create_service_app(
        "orders",
        OrdersSettings(**platform.settings_kwargs),
        routers=[router],
        metadata=[OrdersBase.metadata],
        register_listeners=listeners.register,
    )
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(app.router.lifespan_context(app))
        yield app


def _client(app: FastAPI, platform: Platform, user_id: str | None) -> httpx.AsyncClient:
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    if user_id is not None:
        token = issue_token(platform.settings, user_id=user_id, email="b@test.com")
        client.cookies.set(COOKIE_NAME, token)
    return client


async def _both(
    platform: Platform, route_only: FastAPI, user_id: str | None, **request: Any
) -> tuple[httpx.Response, httpx.Response]:
    """The same request to the orders app (with OrderAttempts) and to the route alone."""
    answers = []
    for app in (platform.apps["orders"], route_only):
        async with _client(app, platform, user_id) as client:
            answers.append(await client.post("/api/orders", **request))
    return answers[0], answers[1]


def _same(hot: httpx.Response, route: httpx.Response) -> None:
    assert (hot.status_code, hot.json()) == (route.status_code, route.json())
    assert hot.headers["content-type"] == route.headers["content-type"]


async def test_a_winning_attempt_answers_as_the_route_does(
    platform: Platform, route_only: FastAPI
) -> None:
    first, second = await seed_ticket(platform, price="20.5"), await seed_ticket(platform)
    buyer = new_user()
    answers = []
    for app, ticket_id in ((platform.apps["orders"], first), (route_only, second)):
        async with _client(app, platform, buyer) as client:
            answers.append(await client.post("/api/orders", json={"ticketId": ticket_id}))
    hot, route = answers
    assert hot.status_code == route.status_code == 201
    assert hot.headers["content-type"] == route.headers["content-type"]
    hot_body, route_body = hot.json(), route.json()
    assert hot_body.keys() == route_body.keys()
    assert hot_body["ticket"] == {"id": first, "title": "Concert", "price": 20.5, "version": 0}
    for key in ("userId", "status", "version"):
        assert hot_body[key] == route_body[key]
    assert hot_body["expiresAt"].endswith("Z") and route_body["expiresAt"].endswith("Z")


async def test_refusals_answer_as_the_route_does(platform: Platform, route_only: FastAPI) -> None:
    seller = new_user()
    own = await seed_ticket(platform, seller=seller)
    held = await seed_ticket(platform)
    async with _client(platform.apps["orders"], platform, new_user()) as client:
        assert (await client.post("/api/orders", json={"ticketId": held})).status_code == 201
    unknown = "6f1c1c57-0d4b-4b5e-9a8e-111111111111"
    cases: list[tuple[str | None, dict[str, Any]]] = [
        (new_user(), {"json": {"ticketId": held}}),  # already reserved
        (new_user(), {"json": {"ticketId": f"  {held.upper()} "}}),  # the same, as typed
        (new_user(), {"json": {"ticketId": unknown}}),
        (seller, {"json": {"ticketId": own}}),
        (None, {"json": {"ticketId": held}}),  # no session: the route answers
        (new_user(), {"json": {}}),
        (new_user(), {"json": {"ticketId": "not-an-id"}}),
        (new_user(), {"json": {"ticketId": 7}}),
        (new_user(), {"json": [held]}),
        (new_user(), {"content": b"{not json", "headers": {"content-type": "application/json"}}),
        (new_user(), {"content": _nested(100_000), "headers": JSON}),
        (new_user(), {"content": held.encode(), "headers": {"content-type": "text/plain"}}),
        (new_user(), {"content": f'{{"ticketId": "{held}"}}'.encode()}),  # no content type
        (
            new_user(),
            {
                "content": f'{{"ticketId": "{held}"}}'.encode(),
                "headers": {"content-type": "application/json-seq"},
            },
        ),
        (
            new_user(),
            {
                "content": f'{{"ticketId": "{held}"}}'.encode(),
                "headers": {"content-type": "application/problem+json; charset=utf-8"},
            },
        ),
    ]
    for user_id, request in cases:
        hot, route = await _both(platform, route_only, user_id, **request)
        assert hot.status_code in (400, 401, 404), request
        _same(hot, route)


JSON = {"content-type": "application/json"}


def _nested(depth: int) -> bytes:
    """JSON nested deeper than a parser's recursion goes."""
    return b"[" * depth + b"]" * depth


async def test_attempts_answered_on_the_hot_path_are_counted(platform: Platform) -> None:
    await platform.start("orders")
    ticket_id = await seed_ticket(platform)
    async with _client(platform.apps["orders"], platform, new_user()) as client:
        await client.post("/api/orders", json={"ticketId": ticket_id})
        await client.post("/api/orders", json={"ticketId": ticket_id})
        metrics = (await client.get("/metrics")).text
    line = 'ticketing_http_requests_total{method="POST",route="/api/orders",status="400"} 1.0'
    assert line in metrics


async def test_an_outage_is_a_503_as_from_the_route_and_the_error_goes_no_further(
    settings_kwargs: dict[str, Any],
) -> None:
    """Nothing answers where the database should be. The attempt, answered in front of the
    route's handlers, is told to come back as the route would tell it, and the error stops
    there (the test client raises any that reaches the server, which would log a traceback
    and close the buyer's connection)."""
    nowhere = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/none"
    settings = OrdersSettings(
        **{**settings_kwargs, "database_url": nowhere, "env": "production", "jwt_key": "k" * 40}
    )
    apps = [
        create_service_app("orders", settings, routers=[router], metadata=[OrdersBase.metadata],
                           hot_path=hot_path) for hot_path in (OrderAttempts, None)
    ]  # fmt: skip
    token = issue_token(settings, user_id=new_user(), email="b@test.com")
    answers = []
    for app in apps:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://t"
            ) as client,
        ):
            client.cookies.set(COOKIE_NAME, token)
            answers.append(await client.post("/api/orders", json={"ticketId": str(uuid4())}))
    hot, route = answers
    assert hot.status_code == 503
    _same(hot, route)
