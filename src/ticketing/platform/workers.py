"""`ticketing up --workers N`: N whole-platform processes on one socket, under a supervisor.

Each worker runs every service, exactly as a single `ticketing up` does; the kernel spreads
connections over them. What stays correct with N > 1 is the services' own business: JetStream
gives each durable consumer's messages to one worker at a time, the outbox relay publishes under
a PostgreSQL advisory lock (on SQLite a row published twice keeps its Nats-Msg-Id, so JetStream
drops the copy), and arq lets one worker run a job. The Stripe sandbox keeps its state in memory,
so it runs once, in the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

import uvicorn
from rich.console import Console
from rich.live import Live

from ticketing.common.db import Database
from ticketing.common.logs import configure_logging
from ticketing.payments.settings import DEV_WEBHOOK_SECRET
from ticketing.platform.gateway import Gateway
from ticketing.platform.services import SERVICES
from ticketing.platform.stripe_sandbox import SandboxServer

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 15.0


@dataclass(frozen=True)
class WorkerPlan:
    """What `ticketing up` decided: where to listen, how many workers, with which settings."""

    host: str
    port: int
    workers: int
    log_level: str
    overrides: dict[str, Any]
    board: Any
    console: Console
    public_url: str


def run_workers(plan: WorkerPlan) -> None:
    asyncio.run(_supervise(plan, dict(plan.overrides)))


async def _supervise(plan: WorkerPlan, overrides: dict[str, Any]) -> None:
    """`overrides` is the supervisor's own copy: the sandbox adds its URL and keys to it."""
    host, port, board = plan.host, plan.port, plan.board
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    local = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    sandbox = await _start_sandbox(local, overrides, board)
    try:
        await _prepare_databases(overrides)
        sock = _bind(host, port)
        pool = WorkerPool(sock, plan.log_level, overrides)
        pool.start(plan.workers)
        for index in range(plan.workers):
            board.add(f"worker {index + 1}", "every service", "process", pool.probe(index))
        try:
            await _watch(pool, stop, board, plan.console, plan.public_url)
        finally:
            await asyncio.to_thread(pool.stop)
            sock.close()
    finally:
        if sandbox is not None:
            await sandbox.stop()


async def _start_sandbox(local: str, overrides: dict[str, Any], board: Any) -> SandboxServer | None:
    if os.environ.get("TICKETING_STRIPE_SECRET_KEY"):
        board.add("Stripe", os.environ.get("TICKETING_STRIPE_API_BASE", "api.stripe.com"),
                  "external")  # fmt: skip
        return None
    secret = os.environ.get("TICKETING_STRIPE_WEBHOOK_SECRET", DEV_WEBHOOK_SECRET)
    sandbox = SandboxServer(webhook_url=f"{local}/api/payments/webhook", webhook_secret=secret)
    await sandbox.start()
    overrides.update(
        stripe_secret_key="sk_test_sandbox",
        stripe_api_base=sandbox.url,
        stripe_webhook_secret=secret,
    )
    board.add("Stripe sandbox", sandbox.url, "in the supervisor (test cards)", lambda: "ready")
    return sandbox


async def _prepare_databases(overrides: dict[str, Any]) -> None:
    """Create databases and tables once, so that N workers starting together never race on DDL."""
    for spec in SERVICES.values():
        if not spec.has_database:
            continue
        settings = spec.settings(**overrides)
        if not settings.is_dev:
            continue  # production runs `ticketing migrate`
        db = Database(settings.service_database_url(spec.name), metadata=spec.metadata())
        try:
            await db.create_all()
        finally:
            await db.dispose()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class WorkerPool:
    """The worker processes; one that dies is replaced."""

    def __init__(self, sock: socket.socket, log_level: str, overrides: dict[str, Any]) -> None:
        self.sock = sock
        self.log_level = log_level
        self.overrides = overrides
        self.processes: list[BaseProcess] = []
        self._context = multiprocessing.get_context("spawn")

    def _spawn(self) -> BaseProcess:
        process = self._context.Process(
            target=serve_worker,
            args=(self.sock, self.log_level, self.overrides),
            name="ticketing-worker",
        )
        process.start()
        return process

    def start(self, count: int) -> None:
        self.processes = [self._spawn() for _ in range(count)]

    def replace_dead(self) -> None:
        for index, process in enumerate(self.processes):
            if not process.is_alive():
                log.warning("worker %d exited with %s; starting another", index + 1,
                            process.exitcode)  # fmt: skip
                self.processes[index] = self._spawn()

    def probe(self, index: int) -> Any:
        def state() -> str:
            process = self.processes[index]
            return f"running (pid {process.pid})" if process.is_alive() else "stopped"

        return state

    def stop(self) -> None:
        for process in self.processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)  # uvicorn shuts down gracefully
        for process in self.processes:
            process.join(STOP_GRACE_SECONDS)
            if process.is_alive():
                process.kill()
                process.join()


async def _watch(
    pool: WorkerPool, stop: asyncio.Event, board: Any, console: Console, public_url: str
) -> None:
    message = f"The platform is at [bold]{public_url}[/bold]  (Ctrl-C stops everything)"
    live: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if console.is_terminal:
        live = Live(board.render(), console=console, refresh_per_second=1)
    else:
        console.print(board.render())
    with live:
        console.print(message)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            if not stop.is_set():
                pool.replace_dead()
            if isinstance(live, Live):
                live.update(board.render())


def serve_worker(sock: socket.socket, log_level: str, overrides: dict[str, Any]) -> None:
    """One worker process: every service behind the gateway, on the supervisor's socket."""
    configure_logging(json_lines=False, level=log_level)
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    routes = [(spec.prefix, spec.create_app(**overrides)) for spec in SERVICES.values()]
    config = uvicorn.Config(Gateway(routes), log_level=log_level.lower())
    uvicorn.Server(config).run(sockets=[sock])
