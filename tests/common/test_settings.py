"""Settings: env vars with the TICKETING_ prefix, and secrets production refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from ticketing.auth.settings import AuthSettings
from ticketing.common.settings import DEV_JWT_KEY, Settings
from ticketing.web.settings import WebSettings


def test_reads_ticketing_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TICKETING_ORDER_TTL_SECONDS", "42")
    monkeypatch.setenv("TICKETING_NATS_URL", "nats://example:4222")
    settings = Settings()
    assert settings.order_ttl_seconds == 42
    assert settings.nats_url == "nats://example:4222"


def test_defaults() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.env == "dev"
    assert settings.order_ttl_seconds == 900
    assert settings.nats_stream == "TICKETING"
    assert settings.nats_subject_prefix == "ticketing"


@pytest.mark.parametrize(
    "key", [None, "", DEV_JWT_KEY, "too-short", "REPLACE_ME_with_a_key_of_at_least_32_chars"]
)
def test_production_refuses_a_missing_default_or_weak_jwt_key(key: str | None) -> None:
    with pytest.raises(ValidationError, match="TICKETING_JWT_KEY"):
        Settings(env="production", jwt_key=key)


def test_production_accepts_a_real_key() -> None:
    settings = Settings(env="production", jwt_key="k" * 48)
    assert not settings.is_dev


def test_production_refuses_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TICKETING_ENV", "production")
    monkeypatch.delenv("TICKETING_JWT_KEY", raising=False)
    with pytest.raises(ValidationError):
        Settings()


def test_database_url_placeholder_is_the_service_name() -> None:
    settings = Settings(database_url="postgresql+asyncpg://db/ticketing_{service}")
    assert settings.service_database_url("orders") == "postgresql+asyncpg://db/ticketing_orders"


def test_default_database_is_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.service_database_url("auth") == f"sqlite+aiosqlite:///{tmp_path}/auth.db"


def test_require_urls_names_what_is_missing() -> None:
    with pytest.raises(ValueError, match="TICKETING_NATS_URL"):
        Settings(database_url="sqlite+aiosqlite:///x.db").require_urls("database_url", "nats_url")


def test_the_reservation_gathers_briefly_the_other_listeners_longer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ticketing.common.app import Runtime
    from ticketing.expiration.settings import ExpirationSettings
    from ticketing.orders.settings import OrdersSettings
    from ticketing.payments.settings import PaymentsSettings
    from ticketing.tickets.settings import TicketsSettings

    gathers = {
        name: Runtime(name, cls(_env_file=None), ()).listener.gather  # type: ignore[call-arg]
        for name, cls in (
            ("orders", OrdersSettings),
            ("tickets", TicketsSettings),
            ("payments", PaymentsSettings),
            ("expiration", ExpirationSettings),
        )
    }
    assert gathers == {"orders": 0.05, "tickets": 0.015, "payments": 0.05, "expiration": 0.05}
    monkeypatch.setenv("TICKETING_LISTENER_GATHER_SECONDS", "0.2")
    settings = TicketsSettings(_env_file=None)  # type: ignore[call-arg]
    assert Runtime("tickets", settings, ()).listener.gather == 0.2


@pytest.mark.parametrize("settings_class", [AuthSettings, WebSettings])
def test_production_needs_the_sites_address_where_links_are_made_with_it(
    settings_class: type[Settings],
) -> None:
    """Auth's emailed links and the web client's pages carry it: the default (this machine)
    would send buyers to 127.0.0.1."""
    secure = {"env": "production", "jwt_key": "k" * 40}
    with pytest.raises(ValueError, match="TICKETING_PUBLIC_URL"):
        settings_class(**secure)
    given = settings_class(**secure, public_url="https://tickets.example")
    assert given.public_url == "https://tickets.example"
    assert Settings(**secure).public_url  # a service that makes no links does without
