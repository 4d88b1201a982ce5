"""The payments service's app factory."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from ticketing.common.app import create_service_app
from ticketing.payments import listeners
from ticketing.payments.charges import Charges
from ticketing.payments.models import PaymentsBase
from ticketing.payments.routes import router
from ticketing.payments.settings import PaymentsSettings

SERVICE = "payments"
MIGRATIONS = Path(__file__).parent / "migrations"


def create_app(settings: PaymentsSettings | None = None) -> FastAPI:
    settings = settings or PaymentsSettings()
    charges = Charges(settings)
    app = create_service_app(
        SERVICE,
        settings,
        migrations=MIGRATIONS,
        routers=[router],
        metadata=[PaymentsBase.metadata],
        register_listeners=lambda listener: listeners.register(listener, charges),
    )
    app.state.charges = charges
    return app
