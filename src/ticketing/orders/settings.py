"""Settings of the orders service."""

from __future__ import annotations

from ticketing.common.settings import Settings


class OrdersSettings(Settings):
    """The common settings. Its listener keeps the default gathering: what a buyer waits on
    here (an expiry or a payment shown) is seconds away, and 50 ms more costs nobody."""
