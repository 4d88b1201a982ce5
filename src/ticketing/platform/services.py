"""Which services exist, where their app factories live and which paths they own."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic.config import Config
from fastapi import FastAPI
from sqlalchemy import MetaData

from ticketing.common.migrate import alembic_config


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    prefix: str | None  # where the gateway routes to it; None for a service with no routes
    factory_path: str  # "module:function", imported only when the service is started
    settings_path: str
    needs: tuple[str, ...] = ("database_url", "nats_url")
    # "module:DeclarativeBase" of the service's own tables; "" when it has only the common
    # ones (outbox, inbox, dead letters); None when it has no database at all.
    models_path: str | None = ""

    @property
    def has_database(self) -> bool:
        return self.models_path is not None

    def metadata(self) -> list[MetaData]:
        if not self.models_path:
            return []
        module, _, attr = self.models_path.partition(":")
        return [getattr(importlib.import_module(module), attr).metadata]

    def migrations_dir(self) -> Path:
        package = importlib.import_module(f"ticketing.{self.name}")
        return Path(package.__file__ or "").parent / "migrations"

    def alembic_config(self, database_url: str) -> Config:
        return alembic_config(
            self.name, url=database_url, metadata=self.metadata(), versions=self.migrations_dir()
        )

    def factory(self) -> Callable[[Any], FastAPI]:
        module, _, attr = self.factory_path.partition(":")
        factory: Callable[[Any], FastAPI] = getattr(importlib.import_module(module), attr)
        return factory

    def settings(self, **overrides: Any) -> Any:
        module, _, attr = self.settings_path.partition(":")
        return getattr(importlib.import_module(module), attr)(**overrides)

    def create_app(self, **overrides: Any) -> FastAPI:
        return self.factory()(self.settings(**overrides))


SERVICES: dict[str, ServiceSpec] = {
    spec.name: spec
    for spec in (
        ServiceSpec(
            "auth",
            "/api/users",
            "ticketing.auth.app:create_app",
            "ticketing.auth.settings:AuthSettings",
            needs=("database_url", "nats_url", "smtp_url"),
            models_path="ticketing.auth.models:AuthBase",
        ),
        ServiceSpec(
            "tickets",
            "/api/tickets",
            "ticketing.tickets.app:create_app",
            "ticketing.tickets.settings:TicketsSettings",
            models_path="ticketing.tickets.models:TicketsBase",
        ),
        ServiceSpec(
            "orders",
            "/api/orders",
            "ticketing.orders.app:create_app",
            "ticketing.orders.settings:OrdersSettings",
            models_path="ticketing.orders.models:OrdersBase",
        ),
        ServiceSpec(
            "expiration",
            None,  # no public routes: it only listens and runs jobs
            "ticketing.expiration.app:create_app",
            "ticketing.expiration.settings:ExpirationSettings",
            needs=("database_url", "nats_url", "redis_url"),
        ),
        ServiceSpec(
            "payments",
            "/api/payments",
            "ticketing.payments.app:create_app",
            "ticketing.payments.settings:PaymentsSettings",
            needs=("database_url", "nats_url", "stripe_secret_key"),
            models_path="ticketing.payments.models:PaymentsBase",
        ),
        ServiceSpec(
            "web",
            "/",
            "ticketing.web.app:create_app",
            "ticketing.web.settings:WebSettings",
            needs=(),
            models_path=None,
        ),
    )
}
