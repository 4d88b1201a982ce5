"""The auth service's app factory."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from ticketing.auth.mail import Mailer
from ticketing.auth.models import AuthBase
from ticketing.auth.routes import router
from ticketing.auth.settings import AuthSettings
from ticketing.common.app import create_service_app

SERVICE = "auth"
MIGRATIONS = Path(__file__).parent / "migrations"


def create_app(settings: AuthSettings | None = None) -> FastAPI:
    settings = settings or AuthSettings()
    app = create_service_app(
        SERVICE,
        settings,
        routers=[router],
        metadata=[AuthBase.metadata],
        migrations=MIGRATIONS,
    )
    app.state.mailer = Mailer(settings.smtp_url, sender=settings.mail_from)
    return app
