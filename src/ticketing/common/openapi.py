"""The OpenAPI document as the contract answers: a 400 in the contract's error body where
FastAPI would document its default 422, which these services never send."""

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

_ERROR_RESPONSE = {
    "description": "Invalid input or a business rule",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
}


def install_contract_openapi(app: FastAPI) -> None:
    """Make `app.openapi()` document the contract's 400s instead of FastAPI's 422s."""
    fastapis = app.openapi  # its own document, every setting of the app in it

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = contract_document(fastapis())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def contract_document(document: dict[str, Any]) -> dict[str, Any]:
    """`document` with each 422 response a 400 in the contract's error body."""
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            if responses.pop("422", None) is not None:
                responses.setdefault("400", _ERROR_RESPONSE)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas["ErrorBody"] = ERROR_BODY_SCHEMA
    return document
