"""The orders service's app factory."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from ticketing.common.app import create_service_app
from ticketing.orders import listeners
from ticketing.orders.hot_path import OrderAttempts
from ticketing.orders.models import OrdersBase
from ticketing.orders.routes import router
from ticketing.orders.settings import OrdersSettings

SERVICE = "orders"
MIGRATIONS = Path(__file__).parent / "migrations"


def create_app(settings: OrdersSettings | None = None) -> FastAPI:
    return create_service_app(
        SERVICE,
        settings or OrdersSettings(),
        migrations=MIGRATIONS,
        routers=[router],
        metadata=[OrdersBase.metadata],
        register_listeners=listeners.register,
        hot_path=OrderAttempts,
    )
