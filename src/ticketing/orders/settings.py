"""Settings of the orders service."""

from __future__ import annotations

from ticketing.common.settings import Settings


class OrdersSettings(Settings):
    # An expiry and a payment are what the buyer waits to see: hold an event back only briefly
    # for others to share its transaction (see TicketsSettings).
    listener_gather_seconds: float = 0.005
