"""`ticketing up`: every service in one process behind one port, on embedded defaults."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import uvicorn
from fastapi import FastAPI
from rich.console import Console
from rich.live import Live
from rich.table import Table

from ticketing.common.gc_tuning import tune_for_serving
from ticketing.common.logs import configure_logging
from ticketing.common.mailbox import mailbox_dir
from ticketing.common.settings import Settings
from ticketing.payments.settings import DEV_WEBHOOK_SECRET, SANDBOX_SECRET_KEY
from ticketing.platform.embedded import (
    ChildServer,
    EmbeddedNats,
    EmbeddedRedis,
    SmtpSink,
    listening_socket,
)
from ticketing.platform.gateway import Gateway, server_config, until_started
from ticketing.platform.services import SERVICES
from ticketing.platform.stripe_sandbox import create_sandbox_app


class ListenError(RuntimeError):
    """The gateway's address cannot be listened on (most often: the port is taken)."""


Probe = Callable[[], str]
EmbeddedServer = ChildServer | SmtpSink


def _always(state: str) -> Probe:
    return lambda: state


def _child(server: ChildServer) -> Probe:
    def probe() -> str:
        if not (server.process and server.process.poll() is None):
            return "stopped"
        return f"running (restarted {server.restarts}x)" if server.restarts else "running"

    return probe


def _service(app: FastAPI) -> Probe:
    def probe() -> str:
        runtime = getattr(app.state, "runtime", None)
        if runtime is None:  # the web client: ready once its API client exists
            return "ready" if hasattr(app.state, "http") else "starting"
        listening = runtime.listener.is_running or not runtime.listens
        return "ready" if runtime.bus.is_connected and listening else "starting"

    return probe


class StatusBoard:
    """What runs where, with a status read live from each part."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, Probe]] = []

    def add(self, part: str, where: str, how: str, probe: Probe | None = None) -> None:
        self.rows.append((part, where, how, probe or _always("-")))

    def render(self) -> Table:
        table = Table(title="ticketing up")
        for column in ("part", "where", "how", "status"):
            table.add_column(column, overflow="fold")
        colours = {"ready": "green", "running": "green", "starting": "yellow", "stopped": "red"}
        for part, where, how, probe in self.rows:
            state = probe()
            colour = colours.get(state.partition(" ")[0], "white")
            table.add_row(part, where, how, f"[{colour}]{state}[/]")
        return table


def _start_infrastructure(
    stack: ExitStack, settings: Settings, board: StatusBoard
) -> dict[str, Any]:
    """Start what no URL names; returns the settings every service gets on top of the env."""
    overrides: dict[str, Any] = {}
    data_dir = settings.data_dir.resolve()

    def use(setting: str, part: str, url: str | None, server: EmbeddedServer, how: str) -> None:
        if url:
            board.add(part, url, "external")
            return
        if isinstance(server, ChildServer):
            server.start(keep_running=True)  # a crashed server comes back on its port and files
            probe = _child(server)
        else:
            server.start()
            probe = _always("running")
        stack.callback(server.stop)
        overrides[setting] = server.url
        board.add(part, server.url, how, probe)

    use("nats_url", "NATS JetStream", settings.nats_url, EmbeddedNats(data_dir / "nats"),
        f"embedded, store {data_dir / 'nats'}")  # fmt: skip
    use("smtp_url", "SMTP", os.environ.get("TICKETING_SMTP_URL"),
        SmtpSink(mailbox_dir(data_dir)), "embedded sink, mail at /dev/mailbox")  # fmt: skip
    use("redis_url", "Redis", settings.redis_url, EmbeddedRedis(data_dir / "valkey"),
        f"embedded valkey, jobs kept in {data_dir / 'valkey'}")  # fmt: skip
    database = settings.database_url or f"sqlite+aiosqlite:///{data_dir}/{{service}}.db"
    board.add("Databases", database, "external" if settings.database_url else "embedded SQLite")
    return overrides


SANDBOX_PREFIX = "/_stripe"


def _stripe_sandbox(
    local: str, overrides: dict[str, Any], board: StatusBoard
) -> list[tuple[str | None, FastAPI]]:
    """Without a Stripe key, serve the local sandbox behind the gateway and point payments at it."""
    if os.environ.get("TICKETING_STRIPE_SECRET_KEY"):
        board.add(
            "Stripe", os.environ.get("TICKETING_STRIPE_API_BASE", "api.stripe.com"), "external"
        )
        return []
    secret = os.environ.get("TICKETING_STRIPE_WEBHOOK_SECRET", DEV_WEBHOOK_SECRET)
    overrides.update(
        stripe_secret_key=SANDBOX_SECRET_KEY,
        stripe_api_base=f"{local}{SANDBOX_PREFIX}",
        stripe_webhook_secret=secret,
    )
    app = create_sandbox_app(
        prefix=SANDBOX_PREFIX,
        webhook_url=f"{local}/api/payments/webhook",
        webhook_secret=secret,
    )
    board.add("Stripe sandbox", f"{local}{SANDBOX_PREFIX}", "in process (test cards)",
              _always("ready"))  # fmt: skip
    return [(SANDBOX_PREFIX, app)]


def _listen(host: str, port: int, *, shared: bool = False) -> socket.socket:
    try:
        return listening_socket(host, port, shared=shared)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(
                f"port {port} on {host} is already in use: is another `ticketing up` running?"
            ) from exc
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


def _local_url(host: str, port: int) -> str:
    """The gateway's address from this machine, wherever it listens."""
    # This machine's own address on the family listened on (:: may be IPv6 only).
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_up(*, host: str, port: int, log_level: str = "info", workers: int = 1) -> None:
    """Start the platform and serve it until Ctrl-C; `workers` > 1 runs that many processes."""
    configure_logging(json_lines=False, level=log_level)
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every SMTP line
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # logs to a file: keep each row on one line
    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    board = StatusBoard()
    with ExitStack() as stack:
        # The port is ours before any embedded server picks a free one, which could be it.
        # With several request workers, each gets a socket of its own on it (see WorkerPool).
        sock = stack.enter_context(_listen(host, port, shared=workers > 1))
        local = _local_url(host, sock.getsockname()[1])  # the port chosen, for --port 0
        overrides = _start_infrastructure(stack, settings, board)
        given = "TICKETING_PUBLIC_URL" in os.environ
        public_url = overrides["public_url"] = settings.public_url if given else local
        # The web client reaches the APIs through this process, whatever the public address.
        overrides.setdefault("api_url", os.environ.get("TICKETING_API_URL") or local)
        announcement = _announcement(public_url, local)
        if workers > 1:
            # Each worker is a whole platform process on the shared socket; what keeps state
            # in memory (the Stripe sandbox) runs once, here.
            from ticketing.platform.workers import WorkerPlan, run_workers

            plan = WorkerPlan(
                local, sock, workers, log_level, overrides, board, console, announcement
            )
            with contextlib.suppress(KeyboardInterrupt):
                run_workers(plan)
            return
        _serve_in_process(local, sock, log_level, overrides, board, console, announcement)


def _announcement(public_url: str, local: str) -> str:
    """What the console says once the platform serves; tests read the address from it."""
    served = "" if public_url == local else f" (served on {local})"
    return f"The platform is at [bold]{public_url}[/bold]{served}  (Ctrl-C stops everything)"


def _serve_in_process(
    local: str,
    sock: socket.socket,
    log_level: str,
    overrides: dict[str, Any],
    board: StatusBoard,
    console: Console,
    announcement: str,
) -> None:
    routes = _stripe_sandbox(local, overrides, board)
    services = {name: spec.create_app(**overrides) for name, spec in SERVICES.items()}
    for name, app in services.items():
        prefix = SERVICES[name].prefix
        routes.append((prefix, app))
        where = f"{overrides['public_url']}{prefix}" if prefix else "(no routes)"
        board.add(f"{name} service", where, "in process", _service(app))
    config = server_config(Gateway(routes, services), log_level)
    tune_for_serving()
    # uvicorn re-raises the signal it handled once shut down; as KeyboardInterrupt (SIGTERM
    # included) it unwinds the caller's block, so the embedded servers stop with us.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # uvicorn's own loop choice (uvloop when installed), as `uvicorn.run` would make it.
    with (
        contextlib.suppress(KeyboardInterrupt),
        asyncio.Runner(loop_factory=config.get_loop_factory()) as runner,
    ):
        runner.run(_serve(uvicorn.Server(config), sock, board, console, announcement))


async def _serve(
    server: uvicorn.Server,
    sock: socket.socket,
    board: StatusBoard,
    console: Console,
    announcement: str,
) -> None:
    """Serve until Ctrl-C; on a terminal the status table stays live above the logs."""
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    await until_started(server, serving)
    if not console.is_terminal:
        console.print(board.render())
        console.print(announcement)
        await serving
        return
    with Live(board.render(), console=console, refresh_per_second=1) as live:
        console.print(announcement)
        while not serving.done():
            await asyncio.wait({serving}, timeout=1)
            live.update(board.render())
    await serving
