"""Which services exist, where their app factories live and which paths they own."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    prefix: str | None  # where the gateway routes to it; None for a service with no routes
    factory_path: str  # "module:function", imported only when the service is started
    settings_path: str
    needs: tuple[str, ...] = ("database_url", "nats_url")

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
        ),
        ServiceSpec(
            "tickets",
            "/api/tickets",
            "ticketing.tickets.app:create_app",
            "ticketing.tickets.settings:TicketsSettings",
        ),
        ServiceSpec(
            "orders",
            "/api/orders",
            "ticketing.orders.app:create_app",
            "ticketing.orders.settings:OrdersSettings",
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
        ),
        ServiceSpec(
            "web",
            "/",
            "ticketing.web.app:create_app",
            "ticketing.web.settings:WebSettings",
            needs=(),
        ),
    )
}
