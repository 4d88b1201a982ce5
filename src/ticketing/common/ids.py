"""Ids are UUID strings; a malformed one in a path is simply an unknown id (404)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from pydantic_core import PydanticCustomError

from ticketing.common.errors import NotFound


def new_id() -> str:
    return str(uuid.uuid4())


def is_id(value: str) -> bool:
    try:
        uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        return False
    return True


def canonical_id(value: str) -> str:
    """An id as the services store it (lower case, hyphens, no braces): its other spellings
    name the same id. Anything else lower-cased, to be unknown later."""
    value = value.strip()
    return str(uuid.UUID(value)) if is_id(value) else value.lower()


def path_id(value: str, *, what: str = "Resource") -> str:
    """The canonical form of an id taken from a path; 404 when it cannot be an id at all."""
    if not is_id(value):
        raise NotFound(f"{what} not found")
    return canonical_id(value)


def id_field_validator(label: str, *, check_format: bool = True) -> Callable[[Any], str]:
    """A Pydantic before-validator for an id in a body, e.g. label "TicketId" for ticketId.

    Without `check_format` a malformed id passes, to be reported as unknown (404) later.
    """

    def check(value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise PydanticCustomError(label, f"{label} must be provided")
        if check_format and not is_id(value.strip()):
            raise PydanticCustomError(label, f"{label} must be a valid id")
        return canonical_id(value)

    return check
