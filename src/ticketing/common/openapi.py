"""The OpenAPI document as the contract answers: a 400 in the contract's error body where
FastAPI would document its default 422, which these services never send; the other errors a
route gives, and the 503 any of them may."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

ERROR_BODY_SCHEMA: dict[str, Any] = {
    "title": "ErrorBody",
    "type": "object",
    "required": ["errors"],
    "properties": {
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["message", "field"],
                "properties": {
                    "message": {"type": "string"},
                    "field": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                },
            },
        }
    },
}

_MEANINGS = {
    400: "Invalid input or a business rule",
    401: "Not signed in, or not yours",
    402: "The card was declined",
    404: "Unknown id",
    409: "Changed by someone else at the same moment: try again",
    413: "Request body too large",
    429: "Too many attempts: wait a minute",
    503: "A part the service needs is not answering, or its events are catching up: "
    "try again in a moment",
}


_HEADERS = {
    429: {
        "Retry-After": {
            "description": "Seconds until the attempts are counted afresh",
            "schema": {"type": "integer"},
        }
    },
}


def _error_response(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _MEANINGS[status],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }
    if status in _HEADERS:
        response["headers"] = _HEADERS[status]
    return response


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses` of a route that answers these errors (in the contract's body)."""
    return {status: _error_response(status) for status in statuses}


def install_contract_openapi(app: FastAPI) -> None:
    """Make `app.openapi()` document the contract's 400s instead of FastAPI's 422s."""
    fastapis = app.openapi  # its own document, every setting of the app in it

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = contract_document(fastapis())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def contract_document(document: dict[str, Any]) -> dict[str, Any]:
    """`document` with each 422 response a 400 in the contract's error body (none where the
    only input is an id in the path: a malformed one is unknown, a 404), a 413 where a body is
    read, and a 503 for all."""
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            if responses.pop("422", None) is not None and _validates_input(operation):
                responses.setdefault("400", _error_response(400))
            if "requestBody" in operation:
                responses.setdefault("413", _error_response(413))
            responses.setdefault("503", _error_response(503))
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas["ErrorBody"] = ERROR_BODY_SCHEMA
    return document


def _validates_input(operation: dict[str, Any]) -> bool:
    in_path = all(p.get("in") == "path" for p in operation.get("parameters", []))
    return "requestBody" in operation or not in_path
