"""POST /api/orders with nothing but what correctness needs: Starlette, asyncpg, no ORM.

Per order: verify the session JWT; in one transaction read the ticket, insert the order under
the same partial unique index the orders service uses, and insert its outbox row. No events are
relayed and nothing listens: this is what any Python service on this machine could do at best.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import jwt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

SCHEMA = """
CREATE TABLE IF NOT EXISTS tickets (
    id varchar(36) PRIMARY KEY,
    title varchar(200) NOT NULL,
    price numeric(12, 2) NOT NULL,
    user_id varchar(36) NOT NULL,
    version integer NOT NULL
);
CREATE TABLE IF NOT EXISTS orders (
    id varchar(36) PRIMARY KEY,
    user_id varchar(36) NOT NULL,
    ticket_id varchar(36) NOT NULL REFERENCES tickets (id),
    status varchar(16) NOT NULL,
    expires_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL,
    version integer NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS uq_orders_one_active_per_ticket
    ON orders (ticket_id) WHERE status <> 'cancelled';
CREATE INDEX IF NOT EXISTS ix_orders_user_created ON orders (user_id, created_at);
CREATE TABLE IF NOT EXISTS outbox (
    seq bigserial PRIMARY KEY,
    event_id varchar(36) NOT NULL UNIQUE,
    type varchar(64) NOT NULL,
    body text NOT NULL,
    created_at timestamptz NOT NULL,
    published_at timestamptz
);
"""

ALREADY_RESERVED = "Ticket is already reserved"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"errors": [{"message": message}]}, status_code=status)


def create_app(dsn: str, jwt_key: str, ttl_seconds: int, pool_size: int = 10) -> Starlette:
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        state["pool"] = await asyncpg.create_pool(dsn, min_size=2, max_size=pool_size)
        try:
            yield
        finally:
            await state["pool"].close()

    async def create_order(request: Request) -> JSONResponse:
        try:
            claims = jwt.decode(request.cookies.get("session", ""), jwt_key, algorithms=["HS256"])
        except jwt.PyJWTError:
            return _error(401, "Not authorized")
        try:
            ticket_id = (await request.json())["ticketId"]
        except (ValueError, KeyError, TypeError):
            return _error(400, "ticketId is required")
        async with state["pool"].acquire() as conn:
            return await _order(conn, user_id=claims["id"], ticket_id=ticket_id)

    async def _order(conn: Any, *, user_id: str, ticket_id: str) -> JSONResponse:
        now = datetime.now(UTC)
        order_id, expires_at = str(uuid.uuid4()), now + timedelta(seconds=ttl_seconds)
        try:
            async with conn.transaction():
                ticket = await conn.fetchrow(
                    "SELECT title, price, user_id, version FROM tickets WHERE id = $1", ticket_id
                )
                if ticket is None:
                    return _error(404, "Ticket not found")
                if ticket["user_id"] == user_id:
                    return _error(400, "You cannot buy your own ticket")
                await conn.execute(
                    "INSERT INTO orders (id, user_id, ticket_id, status, expires_at, created_at,"
                    " version) VALUES ($1, $2, $3, 'created', $4, $5, 0)",
                    order_id, user_id, ticket_id, expires_at, now,
                )  # fmt: skip
                ticket_out = {"id": ticket_id, "price": float(ticket["price"])}
                event = {"id": order_id, "version": 0, "status": "created", "userId": user_id,
                         "expiresAt": expires_at.isoformat(), "ticket": ticket_out}  # fmt: skip
                await conn.execute(
                    "INSERT INTO outbox (event_id, type, body, created_at) VALUES ($1, $2, $3, $4)",
                    str(uuid.uuid4()), "order:created", json.dumps(event), now,
                )  # fmt: skip
        except asyncpg.UniqueViolationError:
            return _error(400, ALREADY_RESERVED)
        body = {**event, "ticket": {**ticket_out, "title": ticket["title"],
                                    "version": ticket["version"]}}  # fmt: skip
        return JSONResponse(body, status_code=201)

    async def healthz(_request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    routes = [Route("/api/orders", create_order, methods=["POST"]), Route("/healthz", healthz)]
    return Starlette(routes=routes, lifespan=lifespan)


def app_from_env() -> Starlette:
    """uvicorn's factory for its worker processes: everything comes from the environment."""
    return create_app(
        os.environ["CEILING_DSN"],
        os.environ["CEILING_JWT_KEY"],
        int(os.environ.get("CEILING_TTL_SECONDS", "900")),
    )
