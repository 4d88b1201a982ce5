"""Request and response bodies of the orders service."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, Field

from ticketing.common.events import CamelModel, Money
from ticketing.common.ids import id_field_validator

TicketId = Annotated[str, BeforeValidator(id_field_validator("TicketId"))]


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
