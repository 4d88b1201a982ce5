"""HTTP routes of the orders service: a thin adapter over service.py."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ticketing.common.app import Runtime, SessionDep, runtime_of
from ticketing.common.auth import COOKIE_NAME, RequireUser, verify_token
from ticketing.common.errors import DomainError, error_response
from ticketing.common.ids import is_id, path_id
from ticketing.orders import service
from ticketing.orders.models import Order
from ticketing.orders.schemas import OrderBody, OrderOut

router = APIRouter(prefix="/api/orders", tags=["orders"])
PUBLISH_WAIT_SECONDS = 0.5


def _out(order: Order | service.PlacedOrder) -> OrderOut:
    return OrderOut.model_validate(order, from_attributes=True)


@router.post("", status_code=201)
async def create_order(body: OrderBody, user: RequireUser, request: Request) -> OrderOut:
    # Most attempts are answered by OrderAttempts below, with what this route would answer.
    return await _place(runtime_of(request), user_id=user.id, ticket_id=body.ticketId)


async def _place(runtime: Runtime, *, user_id: str, ticket_id: str) -> OrderOut:
    order = await service.create_order(
        runtime.db,
        user_id=user_id,
        ticket_id=ticket_id,
        ttl_seconds=runtime.settings.order_ttl_seconds,
    )
    # The 201 leaves once order:created is on the stream, so the reservation is under way when
    # the buyer reads it; not much later in any case (a sweep sends what this wait gave up on).
    await runtime.relay.caught_up(within=PUBLISH_WAIT_SECONDS)
    return _out(order)


class OrderAttempts:
    """POST /api/orders without the framework's request machinery, for every attempt of a rush:
    in-process, FastAPI's routing, dependencies, body validation and exception handling cost
    more than the attempt itself.

    Only a well-formed attempt is answered here (a valid session, a JSON object whose ticketId
    is an id), with the statuses and bodies the route gives; anything else goes on to the
    route, which stays the contract's reference (and the OpenAPI document's source). Inside
    the metrics middleware, so every attempt is counted and timed as before."""

    PATH = "/api/orders"

    def __init__(self, app: ASGIApp, owner: FastAPI) -> None:
        self.app = app
        self.owner = owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.PATH:
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:
            return  # the client went away: nobody to answer
        runtime: Runtime = self.owner.state.runtime
        attempt = _well_formed(runtime, scope, body)
        if attempt is None:
            await self.app(scope, _replay(body, receive), send)
            return
        user_id, ticket_id = attempt
        scope["route"] = _create_route()  # as routing sets it: the metrics label by its path
        try:
            order = await _place(runtime, user_id=user_id, ticket_id=ticket_id)
        except DomainError as exc:
            response = error_response(exc.status_code, exc.message, exc.field)
        else:
            response = JSONResponse(order.model_dump(mode="json", by_alias=True), status_code=201)
        await response(scope, receive, send)


@cache
def _create_route() -> APIRoute:
    return next(r for r in router.routes if isinstance(r, APIRoute) and r.endpoint is create_order)


def _well_formed(runtime: Runtime, scope: Scope, body: bytes) -> tuple[str, str] | None:
    """The buyer and the ticket of an attempt the route would take as it is, else None."""
    headers: dict[bytes, list[bytes]] = {}
    for key, value in scope["headers"]:
        headers.setdefault(key, []).append(value)
    content_type = b"".join(headers.get(b"content-type", [b""])[:1]).lower()
    if content_type and not content_type.startswith(b"application/json"):
        return None  # the route decides what such a body is
    cookies: dict[str, str] = {}
    for header in headers.get(b"cookie", []):
        cookies.update(cookie_parser(header.decode("latin-1")))
    token = cookies.get(COOKIE_NAME)
    claims = verify_token(runtime.settings, token) if token else None
    if claims is None:
        return None
    try:
        data: Any = json.loads(body)
    except ValueError:
        return None
    ticket_id = data.get("ticketId") if isinstance(data, dict) else None
    if not isinstance(ticket_id, str) or not is_id(ticket_id.strip()):
        return None
    return claims.id, ticket_id.strip().lower()  # as OrderBody's validator leaves it


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body again for the route, then whatever the client sends next (a disconnect)."""
    replayed = False

    async def again() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return again


@router.get("")
async def list_orders(user: RequireUser, session: SessionDep) -> list[OrderOut]:
    return [_out(o) for o in await service.my_orders(session, user_id=user.id)]


@router.get("/{order_id}")
async def show_order(order_id: str, user: RequireUser, session: SessionDep) -> OrderOut:
    oid = path_id(order_id, what="Order")
    return _out(await service.get_order(session, order_id=oid, user_id=user.id))


@router.delete("/{order_id}", status_code=204)
async def cancel_order(order_id: str, user: RequireUser, session: SessionDep) -> Response:
    oid = path_id(order_id, what="Order")
    await service.cancel_order(session, order_id=oid, user_id=user.id)
    return Response(status_code=204)
