"""Settings read from `TICKETING_` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_JWT_KEY = "dev-only-insecure-jwt-key-change-me"
STREAM_NAME = "TICKETING"
SUBJECT_PREFIX = "ticketing"
MIN_JWT_KEY_LENGTH = 32  # HS256 wants a key at least as long as its digest


# What the deployment's example secrets say instead of a secret (deploy/k8s).
PLACEHOLDER = "REPLACE_ME"


def is_placeholder(secret: str) -> bool:
    return PLACEHOLDER in secret.upper()


class InsecureSettingsError(ValueError):
    """Production was asked to start with a secret that is missing or the development default."""


class Settings(BaseSettings):
    """What every service reads; a service's own settings class adds its own fields."""

    # A service whose answers carry the site's address (auth's emailed links, the web
    # client's pages and API calls): production must be told it, not left on the default.
    uses_public_url: ClassVar[bool] = False

    model_config = SettingsConfigDict(env_prefix="TICKETING_", extra="ignore")

    env: Literal["dev", "production"] = "dev"
    data_dir: Path = Path(".ticketing")
    database_url: str | None = None
    nats_url: str | None = None
    redis_url: str | None = None
    public_url: str = "http://127.0.0.1:8000"
    jwt_key: str | None = None
    jwt_ttl_seconds: int = 7 * 24 * 3600
    order_ttl_seconds: int = 900
    log_json: bool = False
    log_level: str = "INFO"
    # The stream and subject prefix are fixed by the contract in production; tests give each
    # run its own so that parallel runs on one NATS server never see each other's events.
    nats_stream: str = STREAM_NAME
    nats_subject_prefix: str = SUBJECT_PREFIX
    # 3 on a 3-node JetStream cluster, so the stream survives the loss of a node.
    nats_stream_replicas: int = 1
    nats_connect_timeout_seconds: float = 30.0
    listener_max_deliver: int = 5
    listener_ack_wait_seconds: float = 30.0
    outbox_sweep_seconds: float = 2.0
    # Connections each service keeps per process (PostgreSQL); a request waits for a free one.
    db_pool_size: int = 10
    # Transactions a listener runs at once; events about one ticket or order stay in order.
    listener_lanes: int = 4
    # How long a listener's fetch that found nothing ready waits for a first event.
    listener_fetch_window_seconds: float = 0.2
    # After a batch that was not full, how long a listener lets the next events gather (they
    # share one transaction): lag traded for CPU. Those a buyer waits on set a shorter one.
    listener_gather_seconds: float = 0.05
    # False in a process that only serves requests (`ticketing up --workers N` runs the
    # listeners, job workers and outbox sweeps in processes of their own); it publishes only
    # what its own commits wrote.
    run_listeners: bool = True
    outbox_retention_hours: float = 24 * 7

    @model_validator(mode="after")
    def _refuse_default_secrets_in_production(self) -> Settings:
        key = self.jwt_key or ""
        weak = key == DEV_JWT_KEY or len(key) < MIN_JWT_KEY_LENGTH or is_placeholder(key)
        if self.env == "production" and weak:
            raise InsecureSettingsError(
                "TICKETING_JWT_KEY must be a secret of your own, at least "
                f"{MIN_JWT_KEY_LENGTH} characters, when TICKETING_ENV=production"
            )
        given = self.model_fields_set
        if self.env == "production" and self.uses_public_url and "public_url" not in given:
            raise InsecureSettingsError(
                "TICKETING_PUBLIC_URL must be the site's address (links are made with it)"
                " when TICKETING_ENV=production"
            )
        return self

    @property
    def is_dev(self) -> bool:
        return self.env == "dev"

    @property
    def signing_key(self) -> str:
        """The JWT key; development falls back to a fixed key so a laptop needs no setup."""
        return self.jwt_key or DEV_JWT_KEY

    def service_database_url(self, service: str) -> str:
        """One service's database URL: `{service}` filled in; SQLite in the data dir by default."""
        template = (
            self.database_url or f"sqlite+aiosqlite:///{self.data_dir.resolve()}/{{service}}.db"
        )
        return template.replace("{service}", service)

    def require_urls(self, *names: str) -> None:
        """Fail clearly when a URL a standalone service needs is not configured."""
        missing = [f"TICKETING_{n.upper()}" for n in names if not getattr(self, n)]
        if missing:
            raise ValueError(f"missing settings: {', '.join(missing)}")
