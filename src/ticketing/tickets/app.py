"""The tickets service's app factory."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from ticketing.common.app import create_service_app
from ticketing.tickets import listeners
from ticketing.tickets.models import TicketsBase
from ticketing.tickets.routes import router
from ticketing.tickets.settings import TicketsSettings

SERVICE = "tickets"
MIGRATIONS = Path(__file__).parent / "migrations"


def create_app(settings: TicketsSettings | None = None) -> FastAPI:
    return create_service_app(
        SERVICE,
        settings or TicketsSettings(),
        migrations=MIGRATIONS,
        routers=[router],
        metadata=[TicketsBase.metadata],
        register_listeners=listeners.register,
    )
