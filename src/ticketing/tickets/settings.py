"""Settings of the tickets service."""

from __future__ import annotations

from ticketing.common.settings import Settings


class TicketsSettings(Settings):
    pass
