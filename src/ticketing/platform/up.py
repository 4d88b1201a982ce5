"""`ticketing up`: every service in one process behind one port, on embedded defaults."""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack
from typing import Any

import uvicorn
from rich.console import Console
from rich.table import Table

from ticketing.common.logs import configure_logging
from ticketing.common.settings import Settings
from ticketing.platform.embedded import EmbeddedNats, SmtpSink, port_is_free
from ticketing.platform.gateway import Gateway
from ticketing.platform.services import SERVICES


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
        sink = SmtpSink(data_dir / "mailbox")
        sink.start()
        stack.callback(sink.stop)
        overrides["smtp_url"] = sink.url
        table.add_row("SMTP sink", sink.url, f"embedded, mail kept in {data_dir / 'mailbox'}")
    database = settings.database_url or f"sqlite+aiosqlite:///{data_dir}/{{service}}.db"
    kind = "external" if settings.database_url else "embedded SQLite"
    table.add_row("Databases", database, kind)
    if settings.redis_url:
        table.add_row("Redis", settings.redis_url, "external")
    return overrides


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
        routes = []
        for spec in SERVICES.values():
            routes.append((spec.prefix, spec.create_app(**overrides)))
            table.add_row(f"{spec.name} service", f"{public_url}{spec.prefix}", "in process")
        console.print(table)
        console.print(f"The platform is at [bold]{public_url}[/bold]  (Ctrl-C stops everything)")
        uvicorn.run(Gateway(routes), host=host, port=port, log_level=log_level.lower())
