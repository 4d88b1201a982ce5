"""POST /api/orders without the framework's request machinery: the rush's hot path."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ticketing.common.app import Runtime
from ticketing.common.auth import COOKIE_NAME, verify_token
from ticketing.common.errors import DomainError, domain_error_response, unavailable_response
from ticketing.common.ids import canonical_id, is_id
from ticketing.orders.routes import create_order, place, router


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
            order = await place(runtime, user_id=user_id, ticket_id=ticket_id)
        except DomainError as exc:
            response = domain_error_response(exc)
        except Exception as exc:
            # An outage answered as the route's handlers would: here, in front of them, an
            # error left to rise would reach the server, which closes the connection.
            unavailable = unavailable_response("POST", self.PATH, exc)
            if unavailable is None:
                raise
            response = unavailable
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
    if not _is_json(headers.get(b"content-type", [b""])[0]):
        return None  # the route decides what such a body is (strictly: no type, no JSON)
    cookies: dict[str, str] = {}
    for header in headers.get(b"cookie", []):
        cookies.update(cookie_parser(header.decode("latin-1")))
    token = cookies.get(COOKIE_NAME)
    claims = verify_token(runtime.settings, token) if token else None
    if claims is None:
        return None
    try:
        data: Any = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested too deep to parse
        return None
    ticket_id = data.get("ticketId") if isinstance(data, dict) else None
    if not isinstance(ticket_id, str) or not is_id(ticket_id.strip()):
        return None
    return claims.id, canonical_id(ticket_id)  # as OrderBody's validator leaves it


def _is_json(content_type: bytes) -> bool:
    """As FastAPI reads a body: JSON for application/json and application/*+json only."""
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (
        media.startswith(b"application/") and media.endswith(b"+json")
    )


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
