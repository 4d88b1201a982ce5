"""The expiration service's app factory."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from ticketing.common.app import create_service_app
from ticketing.expiration import listeners
from ticketing.expiration.jobs import JobQueue
from ticketing.expiration.settings import ExpirationSettings

SERVICE = "expiration"
MIGRATIONS = Path(__file__).parent / "migrations"


def create_app(settings: ExpirationSettings | None = None) -> FastAPI:
    settings = settings or ExpirationSettings()
    queue = JobQueue.from_settings(settings)
    return create_service_app(
        SERVICE,
        settings,
        migrations=MIGRATIONS,
        routers=[],
        register_listeners=lambda listener: listeners.register(listener, queue),
        extra_lifespan=queue.running,
        ready_checks={"redis": queue.ping},
    )
