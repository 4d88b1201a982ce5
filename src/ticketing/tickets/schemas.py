"""Request and response bodies of the tickets service."""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field
from pydantic_core import PydanticCustomError

from ticketing.common.events import CamelModel, Money
from ticketing.common.text import is_clean_text

# The most a card payment can be (Stripe's bound for USD): a ticket listed above it could be
# reserved but never paid for. (The least, 0.50, is the payments service's to refuse: the
# contract lists any price greater than 0.)
MAX_PRICE = Decimal("999999.99")
MAX_TITLE = 200
# A price written as a string is a plain decimal number (Decimal itself would also take
# Python's digit separators, "1_000", and names such as "Infinity").
_DECIMAL = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def _title(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PydanticCustomError("title", "Title is required")
    if not is_clean_text(value):
        raise PydanticCustomError("title", "Title must be plain text")
    if len(value.strip()) > MAX_TITLE:
        raise PydanticCustomError("title", f"Title must be at most {MAX_TITLE} characters")
    return value.strip()


def _price(value: Any) -> Decimal:
    message = "Price must be greater than 0"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise PydanticCustomError("price", message)
    if isinstance(value, float) and not math.isfinite(value):
        raise PydanticCustomError("price", message)
    if isinstance(value, str) and not _DECIMAL.fullmatch(value.strip()):
        raise PydanticCustomError("price", message)
    try:
        # Through str, so 10.1 is 10.1 and not its binary neighbour.
        price = Decimal(str(value).strip())
    except InvalidOperation:
        raise PydanticCustomError("price", message) from None
    if not price.is_finite() or price <= 0:
        raise PydanticCustomError("price", message)
    if price > MAX_PRICE:
        raise PydanticCustomError("price", f"Price must be at most {MAX_PRICE}")
    if price != price.quantize(Decimal("0.01")):
        raise PydanticCustomError("price", "Price must have at most 2 decimal places")
    return price


Title = Annotated[str, BeforeValidator(_title), Field(default="", validate_default=True)]
Price = Annotated[Decimal, BeforeValidator(_price), Field(default=None, validate_default=True)]


class TicketBody(BaseModel):
    title: Title
    price: Price


class TicketOut(CamelModel):
    id: str
    title: str
    price: Money
    user_id: str
    version: int
    order_id: str | None
