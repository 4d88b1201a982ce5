"""Every event in the contract: a typed payload, its subject, and the envelope it travels in."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer
from pydantic.alias_generators import to_camel


def money_to_json(amount: Decimal) -> int | float:
    """20 stays 20 and 20.5 stays 20.5 on the wire."""
    return int(amount) if amount == amount.to_integral_value() else float(amount)


# The least a card payment can be (Stripe's bound in usd). The contract lists a ticket at any
# price greater than 0: payments refuses to charge an order under this, the site to list one.
LEAST_CARD_PAYMENT = Decimal("0.50")

# Money travels as a JSON number, as the HTTP contract shows it; Decimal keeps it exact inside.
Money = Annotated[
    Decimal, PlainSerializer(money_to_json, return_type=int | float, when_used="json")
]


class CamelModel(BaseModel):
    """camelCase on the wire, snake_case in Python."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)


class Event(CamelModel):
    """A payload; `type` names it in the contract (e.g. ticket:created)."""

    type: ClassVar[str]


class TicketCreated(Event):
    type: ClassVar[str] = "ticket:created"
    id: str
    version: int
    title: str
    price: Money
    user_id: str


class TicketUpdated(Event):
    type: ClassVar[str] = "ticket:updated"
    id: str
    version: int
    title: str
    price: Money
    user_id: str
    order_id: str | None = None


class OrderTicket(CamelModel):
    id: str
    price: Money


class TicketRef(CamelModel):
    id: str


class OrderCreated(Event):
    type: ClassVar[str] = "order:created"
    id: str
    version: int
    status: str
    user_id: str
    expires_at: datetime
    ticket: OrderTicket


class OrderCancelled(Event):
    type: ClassVar[str] = "order:cancelled"
    id: str
    version: int
    ticket: TicketRef


class OrderCompleted(Event):
    type: ClassVar[str] = "order:completed"
    id: str
    version: int
    ticket: TicketRef


class ExpirationComplete(Event):
    type: ClassVar[str] = "expiration:complete"
    order_id: str


class PaymentCreated(Event):
    type: ClassVar[str] = "payment:created"
    id: str
    order_id: str
    stripe_id: str


EVENT_TYPES: dict[str, type[Event]] = {
    cls.type: cls
    for cls in (
        TicketCreated,
        TicketUpdated,
        OrderCreated,
        OrderCancelled,
        OrderCompleted,
        ExpirationComplete,
        PaymentCreated,
    )
}


def subject_for(event_type: str, prefix: str) -> str:
    """ticket:created travels on <prefix>.ticket.created."""
    return f"{prefix}.{event_type.replace(':', '.')}"


def new_event_id() -> str:
    return str(uuid.uuid4())


class Envelope(BaseModel):
    """What goes on the bus: the event id (also Nats-Msg-Id), its type, time and payload."""

    id: str = Field(default_factory=new_event_id)
    type: str
    time: datetime = Field(default_factory=lambda: datetime.now(UTC))
    data: dict[str, Any]

    @classmethod
    def wrap(cls, event: Event, *, event_id: str | None = None) -> Envelope:
        return cls(id=event_id or new_event_id(), type=event.type, data=to_data(event))

    def payload(self) -> Event:
        """The typed event inside; raises ValueError for an unknown type or a bad payload."""
        model = EVENT_TYPES.get(self.type)
        if model is None:
            raise ValueError(f"unknown event type {self.type!r}")
        return model.model_validate(self.data)


def to_data(event: Event) -> dict[str, Any]:
    return event.model_dump(mode="json", by_alias=True)
