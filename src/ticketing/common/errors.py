"""Domain errors with a status, and the one handler that renders the contract's error body."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
import nats.errors
import nats.js.errors
import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class DomainError(Exception):
    """An error a client caused or may see; rendered as {"errors": [{message, field}]}."""

    status_code = 400

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.headers: dict[str, str] = {}


class BadRequest(DomainError):
    status_code = 400


class NotAuthorized(DomainError):
    status_code = 401

    def __init__(self, message: str = "Not authorized", *, field: str | None = None) -> None:
        super().__init__(message, field=field)


class NotFound(DomainError):
    status_code = 404

    def __init__(self, message: str = "Not found", *, field: str | None = None) -> None:
        super().__init__(message, field=field)


class Conflict(DomainError):
    status_code = 409


class PaymentRequired(DomainError):
    status_code = 402


class TooManyRequests(DomainError):
    status_code = 429

    def __init__(self, message: str, *, retry_after_seconds: int) -> None:
        super().__init__(message)
        # What a client that retries by itself reads, rather than the message.
        self.headers["Retry-After"] = str(retry_after_seconds)


class ServiceUnavailable(DomainError):
    status_code = 503


def error_body(message: str, field: str | None = None) -> dict[str, Any]:
    return {"errors": [{"message": message, "field": field}]}


def error_response(status: int, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, field), status_code=status)


def _validation_item(err: dict[str, Any]) -> dict[str, Any]:
    kind = err.get("type", "")
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
    field = ".".join(loc) or None
    if kind == "json_invalid":
        return {"message": "Request body is not valid JSON", "field": None}
    if field is None and kind in ("model_attributes_type", "dict_type", "missing"):
        return {"message": "Request body must be a JSON object", "field": None}
    message = str(err.get("msg", "Invalid value")).removeprefix("Value error, ")
    if kind == "missing":
        message = f"{field} is required"
    return {"message": message, "field": field}


def domain_error_response(exc: DomainError) -> JSONResponse:
    response = error_response(exc.status_code, exc.message, exc.field)
    response.headers.update(exc.headers)
    return response


async def _on_domain_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DomainError)
    return domain_error_response(exc)


async def on_validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    items = [_validation_item(dict(e)) for e in exc.errors()]
    # One message per field: the first problem found is the one worth fixing first.
    first: dict[str | None, dict[str, Any]] = {}
    for item in items:
        first.setdefault(item["field"], item)
    return JSONResponse({"errors": list(first.values())}, status_code=400)


def http_error_response(exc: StarletteHTTPException) -> JSONResponse:
    """A routing error (no such route, method not allowed) in the contract's shape."""
    messages = {404: "Not found", 405: "Method not allowed"}
    message = messages.get(exc.status_code) or str(exc.detail)
    return JSONResponse(
        error_body(message), status_code=exc.status_code, headers=getattr(exc, "headers", None)
    )


async def _on_http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return http_error_response(exc)


# A part this service depends on that did not answer (its database down or out of
# connections, NATS unreachable): the request was fine, the service cannot serve it now.
# (Not SQLAlchemy's InterfaceError, nor every NATS error: those include misuse, which must
# stay a 500 with its traceback.)
_UNAVAILABLE: tuple[type[Exception], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.TimeoutError,  # no pooled connection came free in time
    nats.errors.NoServersError,
    nats.errors.ConnectionClosedError,
    # NATS restarting: the client reconnecting, its buffer full meanwhile, the stream not
    # answering yet
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    OSError,  # refused, unreachable, a name that does not resolve, timed out
)


# PostgreSQL's own words for "not now" (SQLAlchemy's asyncpg dialect raises them as plain
# DBAPIError): connection exceptions, too many clients or out of resources, a server
# shutting down or starting up.
_PG_UNAVAILABLE_STATES = ("08", "53", "57P01", "57P02", "57P03")
# SQLite's OperationalError is also its word for SQL it cannot run ("no such table"): only
# these say the file is busy or out of reach.
_SQLITE_UNAVAILABLE = ("locked", "busy", "unable to open", "disk")


# The driver's own words for a connection lost: closed under a statement, or its protocol left
# mid-operation by one that was cut off.
_CONNECTION_LOST = (asyncpg.ConnectionDoesNotExistError, asyncpg.InternalClientError)


def is_unavailable(exc: BaseException) -> bool:
    """Whether `exc` says a part did not answer (an outage), not that the work is wrong: as
    SQLAlchemy raises it, or as the driver does (a connection of its own, not pooled)."""
    driver: BaseException | None = exc
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        if exc.connection_invalidated:
            return True  # the connection broke under the statement
        state = str(getattr(exc.orig, "sqlstate", None) or "")
        if state:
            return state.startswith(_PG_UNAVAILABLE_STATES)
        if type(exc.orig).__module__.startswith(("sqlite3", "aiosqlite")):
            return any(word in str(exc.orig).lower() for word in _SQLITE_UNAVAILABLE)
        driver = getattr(exc.orig, "orig", None)  # SQLAlchemy's adapter keeps the driver's
    elif isinstance(exc, asyncpg.PostgresError):
        return str(exc.sqlstate or "").startswith(_PG_UNAVAILABLE_STATES)
    return isinstance(exc, _UNAVAILABLE) or isinstance(driver, _CONNECTION_LOST)


def unavailable_response(method: str, path: str, exc: BaseException) -> JSONResponse | None:
    """The 503 for an outage (see is_unavailable), logged in one line; None for anything else.
    While a part is down every request would print the same traceback."""
    if not is_unavailable(exc):
        return None
    log.warning("%s %s: unavailable: %r", method, path, exc)
    return error_response(503, "Service unavailable; please try again shortly")


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    response = unavailable_response(request.method, request.url.path, exc)
    if response is not None:
        return response
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "Something went wrong")


def install_error_handlers(app: FastAPI) -> None:
    """Render every error, expected or not, in the contract's shape."""
    app.add_exception_handler(DomainError, _on_domain_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    # The kinds of error an outage raises get their handler by class, so that the answer is
    # the whole of it: the handler for any Exception answers, then re-raises (Starlette), and
    # uvicorn then logs a traceback and closes the client's keep-alive connection.
    outages: tuple[type[Exception], ...] = (sqlalchemy.exc.DBAPIError, *_UNAVAILABLE)
    for outage in outages:
        app.add_exception_handler(outage, _on_unexpected)
    app.add_exception_handler(Exception, _on_unexpected)
