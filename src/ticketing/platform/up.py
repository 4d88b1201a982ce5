"""`ticketing up`: every service in one process behind one port, on embedded defaults."""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack
from typing import Any

import uvicorn
from fastapi import FastAPI
from rich.console import Console
from rich.table import Table

from ticketing.common.logs import configure_logging
from ticketing.common.mailbox import mailbox_dir
from ticketing.common.settings import Settings
from ticketing.payments.settings import DEV_WEBHOOK_SECRET
from ticketing.platform.embedded import EmbeddedNats, EmbeddedRedis, SmtpSink, port_is_free
from ticketing.platform.gateway import Gateway
from ticketing.platform.services import SERVICES
from ticketing.platform.stripe_sandbox import create_sandbox_app


class PortBusyError(RuntimeError):
    pass


def _start_infrastructure(stack: ExitStack, settings: Settings, table: Table) -> dict[str, Any]:
    """Start what no URL names; returns the settings every service gets on top of the env."""
    overrides: dict[str, Any] = {}
    data_dir = settings.data_dir.resolve()
    if settings.nats_url:
        table.add_row("NATS JetStream", settings.nats_url, "external")
    else:
        nats = EmbeddedNats(data_dir / "nats")
        nats.start()
        stack.callback(nats.stop)
        overrides["nats_url"] = nats.url
        table.add_row("NATS JetStream", nats.url, f"embedded, store {data_dir / 'nats'}")
    smtp_url = os.environ.get("TICKETING_SMTP_URL")
    if smtp_url:
        table.add_row("SMTP", smtp_url, "external")
    else:
        sink = SmtpSink(mailbox_dir(data_dir))
        sink.start()
        stack.callback(sink.stop)
        overrides["smtp_url"] = sink.url
        table.add_row("SMTP sink", sink.url, "embedded, mail shown at /dev/mailbox")
    database = settings.database_url or f"sqlite+aiosqlite:///{data_dir}/{{service}}.db"
    kind = "external" if settings.database_url else "embedded SQLite"
    table.add_row("Databases", database, kind)
    if settings.redis_url:
        table.add_row("Redis", settings.redis_url, "external")
    else:
        redis = EmbeddedRedis(data_dir / "valkey")
        redis.start()
        stack.callback(redis.stop)
        overrides["redis_url"] = redis.url
        table.add_row("Valkey (Redis)", redis.url, f"embedded, jobs kept in {data_dir / 'valkey'}")
    return overrides


SANDBOX_PREFIX = "/_stripe"


def _stripe_sandbox(
    host: str, port: int, overrides: dict[str, Any], table: Table
) -> list[tuple[str | None, FastAPI]]:
    """Without a Stripe key, serve the local sandbox behind the gateway and point payments at it."""
    if os.environ.get("TICKETING_STRIPE_SECRET_KEY"):
        table.add_row(
            "Stripe", os.environ.get("TICKETING_STRIPE_API_BASE", "api.stripe.com"), "external"
        )
        return []
    local = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    secret = os.environ.get("TICKETING_STRIPE_WEBHOOK_SECRET", DEV_WEBHOOK_SECRET)
    overrides.update(
        stripe_secret_key="sk_test_sandbox",
        stripe_api_base=f"{local}{SANDBOX_PREFIX}",
        stripe_webhook_secret=secret,
    )
    app = create_sandbox_app(
        prefix=SANDBOX_PREFIX,
        webhook_url=f"{local}/api/payments/webhook",
        webhook_secret=secret,
    )
    table.add_row("Stripe sandbox", f"{local}{SANDBOX_PREFIX}", "in process (test cards)")
    return [(SANDBOX_PREFIX, app)]


def run_up(*, host: str, port: int, log_level: str = "info") -> None:
    """Start the platform and serve it until Ctrl-C."""
    configure_logging(json_lines=False, level=log_level)
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every SMTP line
    console = Console()
    if not port_is_free(host, port):
        raise PortBusyError(
            f"port {port} on {host} is already in use: is another `ticketing up` running?"
        )
    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    table = Table(title="ticketing up")
    for column in ("part", "where", "how"):
        table.add_column(column)
    with ExitStack() as stack:
        overrides = _start_infrastructure(stack, settings, table)
        if "TICKETING_PUBLIC_URL" not in os.environ:
            shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
            overrides["public_url"] = f"http://{shown}:{port}"
        public_url = overrides.get("public_url", settings.public_url)
        routes = _stripe_sandbox(host, port, overrides, table)
        for spec in SERVICES.values():
            routes.append((spec.prefix, spec.create_app(**overrides)))
            where = f"{public_url}{spec.prefix}" if spec.prefix else "(no routes)"
            table.add_row(f"{spec.name} service", where, "in process")
        console.print(table)
        console.print(f"The platform is at [bold]{public_url}[/bold]  (Ctrl-C stops everything)")
        uvicorn.run(Gateway(routes), host=host, port=port, log_level=log_level.lower())
