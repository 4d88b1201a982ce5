"""Request and response bodies of the payments service."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field, StrictInt
from pydantic_core import PydanticCustomError

from ticketing.common.ids import id_field_validator

# Stripe's tokens and payment method ids: tok_..., pm_..., letters, digits and underscores.
TOKEN = re.compile(r"[A-Za-z0-9_]{1,255}")


def _token(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PydanticCustomError("token", "Token must be provided")
    if not TOKEN.fullmatch(value.strip()):
        raise PydanticCustomError("token", "Token is not a valid card token")
    return value.strip()


# The contract has no 400 for a malformed order id: an id that cannot exist is unknown (404).
OrderId = Annotated[str, BeforeValidator(id_field_validator("OrderId", check_format=False))]


class PaymentBody(BaseModel):
    # Named as the client sends them: a missing field's error location uses the field name.
    orderId: OrderId = Field(default="", validate_default=True)
    token: Annotated[str, BeforeValidator(_token)] = Field(default="", validate_default=True)


class PaymentOut(BaseModel):
    id: str


class SucceededIntent(BaseModel):
    """The part of a payment_intent.succeeded event that records a payment, in the shapes
    Stripe sends (and the payments table holds)."""

    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_]{1,255}$")]
    amount: Annotated[StrictInt, Field(ge=0, lt=2**31)]
    currency: Annotated[str, Field(pattern=r"^[a-z]{3}$")]
    metadata: dict[str, str] = {}
