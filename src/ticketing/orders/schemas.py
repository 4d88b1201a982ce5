"""Request and response bodies of the orders service."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field
from pydantic_core import PydanticCustomError

from ticketing.common.events import CamelModel, Money
from ticketing.common.ids import is_id


def _ticket_id(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PydanticCustomError("ticketId", "TicketId must be provided")
    if not is_id(value.strip()):
        raise PydanticCustomError("ticketId", "TicketId must be a valid id")
    return value.strip().lower()


TicketId = Annotated[str, BeforeValidator(_ticket_id)]


class OrderBody(BaseModel):
    # Named as the client sends it: a missing field's error location uses the field name.
    ticketId: TicketId = Field(default="", validate_default=True)


class OrderTicketOut(CamelModel):
    id: str
    title: str
    price: Money
    version: int


class OrderOut(CamelModel):
    id: str
    user_id: str
    status: str
    expires_at: datetime
    version: int
    ticket: OrderTicketOut
