"""Settings of the tickets service."""

from __future__ import annotations

from ticketing.common.settings import Settings


class TicketsSettings(Settings):
    # The reservation is what buyers and sellers see of an order: hold an event back only
    # briefly for others to share its transaction (the other services keep the default).
    listener_gather_seconds: float = 0.015
