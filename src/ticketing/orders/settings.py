"""Settings of the orders service."""

from __future__ import annotations

from ticketing.common.settings import Settings


class OrdersSettings(Settings):
    pass
