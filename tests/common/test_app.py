"""The app factory: error bodies, health, readiness and metrics, on a tiny service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import nats.errors
import nats.js.errors
import pytest
from fastapi import APIRouter, FastAPI
from pydantic import BaseModel
from sqlalchemy import text

from tests.support import eventually
from ticketing.common.app import Runtime, SessionDep, create_service_app
from ticketing.common.auth import RequireUser, issue_token
from ticketing.common.errors import Conflict
from ticketing.common.events import ExpirationComplete
from ticketing.common.outbox import add_event
from ticketing.common.settings import Settings
from ticketing.platform.embedded import free_port

router = APIRouter(prefix="/api/probe")


class Body(BaseModel):
    ticketId: str
    quantity: int


@router.post("/items", status_code=201)
async def create_item(body: Body, session: SessionDep) -> dict[str, str]:
    return {"ticketId": body.ticketId}


@router.get("/one")
async def one(session: SessionDep) -> dict[str, int]:
    return {"one": int(await session.scalar(text("SELECT 1")) or 0)}


@router.get("/mine")
async def mine(user: RequireUser) -> dict[str, str]:
    return {"id": user.id}


@router.post("/mine", status_code=201)
async def add_mine(body: Body, user: RequireUser) -> dict[str, str]:
    return {"id": user.id, "ticketId": body.ticketId}


@router.get("/conflict")
async def conflict() -> None:
    raise Conflict("Lost the race", field="ticketId")


@router.get("/nats-restarting/{kind}")
async def nats_restarting(kind: str) -> None:
    raise _NATS_RESTARTING[kind]()


_NATS_RESTARTING: dict[str, type[Exception]] = {
    "reconnecting": nats.errors.ConnectionReconnectingError,
    "buffer": nats.errors.OutboundBufferLimitError,
    "stale": nats.errors.StaleConnectionError,
    "no-stream-response": nats.js.errors.NoStreamResponseError,
}


@router.get("/boom")
async def boom() -> None:
    raise RuntimeError("a bug")


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    return create_service_app("probe", settings, routers=[router])


@pytest.fixture
def app_runtime(app: FastAPI) -> Runtime:
    runtime: Runtime = app.state.runtime
    return runtime


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            yield c


async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "database": "ok", "nats": "ok"}


async def test_unknown_route_is_404_with_the_error_body(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/nothing-here")
    assert response.status_code == 404
    assert response.json() == {"errors": [{"message": "Not found", "field": None}]}


async def test_malformed_json_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/probe/items", content=b"{oops", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json() == {
        "errors": [{"message": "Request body is not valid JSON", "field": None}]
    }


async def test_a_body_that_is_not_an_object_is_400(client: httpx.AsyncClient) -> None:
    for body in ([1, 2], "text", None):
        response = await client.post("/api/probe/items", json=body)
        assert response.status_code == 400
        assert response.json()["errors"][0]["field"] is None


async def test_validation_errors_name_fields_as_the_client_sent_them(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/api/probe/items", json={"quantity": "many"})
    assert response.status_code == 400
    fields = {e["field"]: e["message"] for e in response.json()["errors"]}
    assert fields["ticketId"] == "ticketId is required"
    assert set(fields) == {"ticketId", "quantity"}


async def test_domain_errors_carry_their_status(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/probe/conflict")
    assert response.status_code == 409
    assert response.json() == {"errors": [{"message": "Lost the race", "field": "ticketId"}]}


async def test_require_user_is_401_without_a_session(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    response = await client.get("/api/probe/mine")
    assert response.status_code == 401
    assert response.json() == {"errors": [{"message": "Not authorized", "field": None}]}
    client.cookies.set("session", issue_token(settings, user_id="u-1", email="a@b.com"))
    assert (await client.get("/api/probe/mine")).json() == {"id": "u-1"}


@pytest.mark.parametrize("body", [b"{oops", b"", b'{"quantity": "many"}', b"[1]"])
async def test_not_signed_in_is_401_whatever_the_body(
    client: httpx.AsyncClient, settings: Settings, body: bytes
) -> None:
    """Not signed in comes first, as on a route that reads no body: FastAPI parses the JSON
    before it runs the route's dependencies, which would have answered 400 to a body that
    does not parse. Signed in, the body's problem is the answer."""
    json_body = {"content-type": "application/json"}
    for cookie in (None, "not-a-token"):
        if cookie:
            client.cookies.set("session", cookie)
        response = await client.post("/api/probe/mine", content=body, headers=json_body)
        assert response.status_code == 401, (cookie, response.text)
        assert response.json() == {"errors": [{"message": "Not authorized", "field": None}]}
    client.cookies.set("session", issue_token(settings, user_id="u-1", email="a@b.com"))
    response = await client.post("/api/probe/mine", content=body, headers=json_body)
    assert response.status_code == 400
    # A route for anyone still answers the body's problem.
    client.cookies.clear()
    assert (
        await client.post("/api/probe/items", content=body, headers=json_body)
    ).status_code == 400


async def test_method_not_allowed_keeps_the_error_shape(client: httpx.AsyncClient) -> None:
    response = await client.delete("/api/probe/items")
    assert response.status_code == 405
    assert response.json()["errors"][0]["message"] == "Method not allowed"


async def test_an_unexpected_error_is_500_with_the_error_body(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/probe/boom")
    assert response.status_code == 500
    assert response.json() == {"errors": [{"message": "Something went wrong", "field": None}]}


@pytest.mark.parametrize("kind", sorted(_NATS_RESTARTING))
async def test_nats_restarting_is_503_not_500(client: httpx.AsyncClient, kind: str) -> None:
    response = await client.get(f"/api/probe/nats-restarting/{kind}")
    assert response.status_code == 503, response.text


async def test_a_database_that_does_not_answer_is_503_not_500(
    settings_kwargs: dict[str, Any],
) -> None:
    """Nothing listens where the database should be (production starts anyway and says it is
    not ready): a request that needs it is told to come back, in the contract's shape. The
    error stops at its handler (the test client raises any that reaches the server, which
    would log a traceback and close the client's keep-alive connection)."""
    nowhere = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/none"
    settings = Settings(
        **{**settings_kwargs, "database_url": nowhere, "env": "production", "jwt_key": "k" * 40}
    )
    app = create_service_app("probe", settings, routers=[router])
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            response = await c.get("/api/probe/one")
            ready = await c.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {
        "errors": [{"message": "Service unavailable; please try again shortly", "field": None}]
    }
    assert ready.status_code == 503


async def test_metrics_count_requests_by_route(client: httpx.AsyncClient) -> None:
    await client.post("/api/probe/items", json={"ticketId": "t", "quantity": 1})
    text = (await client.get("/metrics")).text
    assert (
        'ticketing_http_requests_total{method="POST",route="/api/probe/items",status="201"} 1.0'
        in text
    )
    assert "ticketing_http_request_duration_seconds_bucket" in text


async def test_a_head_is_answered_as_its_get_and_counted_by_its_route(
    client: httpx.AsyncClient,
) -> None:
    head, get = await client.head("/api/probe/one"), await client.get("/api/probe/one")
    assert head.status_code == get.status_code == 200
    assert head.headers["content-type"] == get.headers["content-type"]
    text = (await client.get("/metrics")).text
    assert (
        'ticketing_http_requests_total{method="HEAD",route="/api/probe/one",status="200"}' in text
    )
    # Not a route for GET: as for any method a route does not take.
    assert (await client.head("/api/probe/items")).status_code == 405


async def test_metrics_count_events_published_from_the_outbox(
    client: httpx.AsyncClient, app_runtime: Runtime
) -> None:
    async with app_runtime.db.transaction() as session:
        add_event(session, ExpirationComplete(order_id="o-1"))
    line = 'ticketing_events_published_total{type="expiration:complete"} 1.0'

    async def counted() -> bool:
        return line in (await client.get("/metrics")).text

    await eventually(counted)


async def test_the_openapi_document_says_400_in_the_error_shape_not_422(
    client: httpx.AsyncClient,
) -> None:
    document = (await client.get("/openapi.json")).json()
    create = document["paths"]["/api/probe/items"]["post"]["responses"]
    assert set(create) == {"201", "400", "413", "503"}
    assert create["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"
    }
    assert "422" not in str(document)
    assert "HTTPValidationError" not in document["components"]["schemas"]


async def test_a_pooled_connection_the_server_closed_is_replaced_before_it_is_used(
    client: httpx.AsyncClient, app_runtime: Runtime, infra: Any
) -> None:
    """PostgreSQL restarted, or an admin ended the backends, while the connections sat in the
    pool: the driver has read the end of each, and the pool hands out a new one instead, so
    no request meets a dead connection (each used to fail once, a 503)."""
    import asyncpg

    from tests.conftest import PG_URL

    if not infra.postgres:
        pytest.skip("SQLite has no server to drop a connection")
    assert (await client.get("/api/probe/one")).status_code == 200  # a connection is pooled
    # The relay's housekeeping shares the pool: it must not be the one to meet the dead
    # connection first (the pool would be fresh again for the request this is about).
    await app_runtime.relay.stop()
    pool: Any = app_runtime.db.engine.sync_engine.pool  # its queue of idle connections
    admin = await asyncpg.connect(PG_URL.replace("+asyncpg", "") + "/postgres")
    try:
        database = app_runtime.db.engine.url.database
        await admin.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE datname = $1",
            database,
        )  # waits until each has ended
    finally:
        await admin.close()
    # Until this process's driver has read the end of every pooled connection (its loop
    # turns once or twice), as it long has by the next request after a restart.
    await eventually(lambda: all(_closed(record) for record in _idle(pool)))
    answers = [(await client.get("/api/probe/one")).status_code for _ in range(3)]
    assert answers == [200, 200, 200]


def _idle(pool: Any) -> list[Any]:
    """The pool's idle connection records (its asyncio queue's items: no public view)."""
    return list(pool._pool._queue._queue)


def _closed(record: Any) -> bool:
    connection = record.dbapi_connection
    return connection is None or bool(connection.driver_connection.is_closed())
