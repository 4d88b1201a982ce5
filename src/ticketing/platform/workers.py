"""`ticketing up --workers N`: N request workers and two events workers, under a supervisor.

Each request worker serves every service behind the gateway on a socket of its own on the
platform's port (the kernel spreads connections over them); the events workers run the
listeners, the expiration job worker and the outbox sweeps (every process publishes what its
own commits wrote), so that events are handled at once instead of queueing behind requests:
one those of tickets (the reservation), the other those of every other service. That last
one runs at a lower CPU priority (nice), the first a little above the requests where it may:
what a buyer waits on (an answer, then the reservation of what was sold) comes first; what
follows a sale (the replicas of orders and payments, the expiry jobs) takes what the cores
leave, in bigger batches the longer it waits.

What stays correct with several processes is the services' own business: JetStream gives each
durable consumer's messages to one process at a time, the outbox sweep runs under a PostgreSQL
advisory lock (and a row published twice, by a sweep and by the process that committed it,
keeps its Nats-Msg-Id, so JetStream drops the copy), and arq lets one worker run a job. The
Stripe sandbox keeps its state in memory, so it runs once, in the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any

import uvicorn
from rich.console import Console
from rich.live import Live

from ticketing.common.backoff import Backoff
from ticketing.common.db import Database
from ticketing.common.gc_tuning import tune_for_serving
from ticketing.common.logs import configure_logging
from ticketing.payments.settings import DEV_WEBHOOK_SECRET, SANDBOX_SECRET_KEY
from ticketing.platform.embedded import joining_socket, listening_socket
from ticketing.platform.gateway import Gateway, server_config, until_started
from ticketing.platform.lifeline import worker_main
from ticketing.platform.services import SERVICES, ServiceSpec
from ticketing.platform.stripe_sandbox import SandboxServer

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 15.0
# How much lower the CPU priority of the events worker off the buyers' path is. A sale's
# follow-up work, at the same priority, took a core from the requests in bursts: a rush's
# slowest answers were those that waited behind it.
FOLLOW_UP_NICENESS = 15
# And how much higher the reservation's worker's is. At the requests' priority, each of its
# round trips to PostgreSQL waited its turn for a core behind them: a rush's convergence p99
# was 94-109 ms (six runs). Slightly above (it takes a sixth of a core), 71-93 ms in 24 runs of
# 26, the requests' p99 the same within the noise (bench/README.md). Raising a priority takes
# the privilege to (root, CAP_SYS_NICE): without it, the worker runs at the requests'.
RESERVATION_NICENESS = -2
# A worker that died before it served is started again after a pause, doubled for each
# start-up in a row that failed, up to the longest.
START_AGAIN_SECONDS = 1.0
START_AGAIN_LONGEST_SECONDS = 30.0


@dataclass(frozen=True)
class WorkerPlan:
    """What `ticketing up` decided: where to listen, how many workers, with which settings."""

    local: str  # the gateway's address from this machine
    sock: socket.socket  # bound before anything else started, so nothing else can take the port
    workers: int
    log_level: str
    overrides: dict[str, Any]
    board: Any
    console: Console
    announcement: str


def run_workers(plan: WorkerPlan) -> None:
    asyncio.run(_supervise(plan, dict(plan.overrides)))


async def _supervise(plan: WorkerPlan, overrides: dict[str, Any]) -> None:
    """`overrides` is the supervisor's own copy: the sandbox adds its URL and keys to it."""
    board = plan.board
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sandbox = await _start_sandbox(plan.local, overrides, board)
    try:
        await _prepare_databases(overrides)
        pool = WorkerPool(plan.sock, plan.log_level, overrides)
        pool.start(plan.workers)
        for index, role in enumerate(pool.roles):
            board.add(f"{role.name} worker", role.doing, "process", pool.probe(index))
        try:
            await _watch(pool, stop, board, plan.console, plan.announcement)
        finally:
            await asyncio.to_thread(pool.stop)
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
        stripe_secret_key=SANDBOX_SECRET_KEY,
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


@dataclass(frozen=True)
class Role:
    """What a worker process does: serve requests on the shared socket, or handle the events
    of some services."""

    name: str
    listens: bool
    services: frozenset[str] = frozenset()
    niceness: int = 0

    def runs(self, service: str) -> bool:
        return service in self.services

    @property
    def doing(self) -> str:
        if not self.listens:
            return "every service's requests"
        return f"the listeners and outbox sweeps of {', '.join(sorted(self.services))}"


REQUESTS = Role("requests", listens=False)
# The service on the path from an order's 201 until its ticket reads reserved (the request
# worker that took the order publishes order:created itself; tickets reserves and publishes
# ticket:updated), and the rest. Each service's events go to one process, so its batches are
# whole (a batch shares one transaction: under load, most of a listener's cost), and the
# reservation never queues behind the orders, payments or expiration handlers.
_RESERVATION_PATH = frozenset({"tickets"})
EVENT_ROLES = (
    Role("events", listens=True, services=_RESERVATION_PATH, niceness=RESERVATION_NICENESS),
    Role(
        "events",
        listens=True,
        services=frozenset(SERVICES) - _RESERVATION_PATH,
        niceness=FOLLOW_UP_NICENESS,
    ),
)
# Every process has a pool per service it runs: all of them together, at their fullest, stay
# within this, under PostgreSQL's default max_connections (100) with room for migrations and
# psql. Pools only open what is used at once.
CONNECTION_BUDGET = 90
MIN_POOL_SIZE = 2
# An events worker's pools serve a few statements at a time (a listener's batch, the relay's
# marks and sweep, the expiry jobs' announcements); the request workers' pools share the rest:
# a request worker serves as many attempts at once as its clients send, and an attempt that
# waits for a connection waits for another's answer to be read first (with 4 each, the
# rush's slowest attempts were those).
EVENTS_POOL_SIZE = 3
# Two, so that a burst of events (a rush, or a rush's orders expiring together) has a core
# when the request workers leave one. One that dies is replaced; meanwhile its services'
# events wait in their durable consumers.
EVENT_WORKERS = len(EVENT_ROLES)
# A worker is told its role by its place here: unpickling a Role would import this module
# before the worker has asked to stop with its supervisor (lifeline.worker_main).
ROLES = (REQUESTS, *EVENT_ROLES)


def pool_sizes(roles: Sequence[Role]) -> dict[Role, int]:
    """Connections each service's pool keeps in a worker of each role, within
    CONNECTION_BUDGET: EVENTS_POOL_SIZE in an events worker, the rest shared by the request
    workers' pools."""
    events = sum(_databases(role) for role in roles if role.listens) * EVENTS_POOL_SIZE
    requests = sum(_databases(role) for role in roles if not role.listens)
    size = (CONNECTION_BUDGET - events) // max(requests, 1)
    if size < MIN_POOL_SIZE:
        log.warning(
            "%d request workers x %d connections a service may exceed PostgreSQL's"
            " max_connections; set TICKETING_DB_POOL_SIZE, or raise max_connections",
            sum(1 for role in roles if not role.listens), MIN_POOL_SIZE,
        )  # fmt: skip
    return {role: EVENTS_POOL_SIZE if role.listens else max(size, MIN_POOL_SIZE) for role in roles}


def _databases(role: Role) -> int:
    """How many pools a worker of the role fills: one per service with a database whose
    events it handles, or whose requests it serves. (A request worker also builds the services
    without routes, expiration, but nothing there makes a statement: their pools stay empty.)"""
    return sum(1 for spec in SERVICES.values() if spec.has_database and _fills(role, spec))


def _fills(role: Role, spec: ServiceSpec) -> bool:
    return role.runs(spec.name) if role.listens else spec.prefix is not None


@dataclass
class Restarts:
    """When a dead worker is started again. One whose start-up failed (it exited with an
    error before it served) most likely failed on what will still be so a moment later (the
    database away, say): again after a pause, growing with each such failure in a row,
    instead of a new process every second or two, each with a traceback. Any other (a crash
    once serving, a kill at any time) at once."""

    backoff: Backoff = field(
        default_factory=lambda: Backoff(START_AGAIN_SECONDS, START_AGAIN_LONGEST_SECONDS)
    )  # of start-ups that failed
    due: float | None = None  # set from when the worker was found dead until it is replaced

    def died(self, start_failed: bool, now: float) -> float:
        """Note the worker found dead; the pause before another starts."""
        pause = 0.0
        if start_failed:
            pause = self.backoff.failed()
        else:
            self.backoff.succeeded()
        self.due = now + pause
        return pause

    def start_now(self, now: float) -> bool:
        """Whether the dead worker's replacement is due (once: the next is due at its death)."""
        if self.due is None or now < self.due:
            return False
        self.due = None
        return True


class WorkerPool:
    """The worker processes; one that dies is replaced by one of the same role."""

    def __init__(self, sock: socket.socket, log_level: str, overrides: dict[str, Any]) -> None:
        self.sock = sock
        self.log_level = log_level
        self.overrides = overrides
        self.roles: list[Role] = []
        self.pool_sizes: dict[Role, int] = {}
        self.processes: list[BaseProcess] = []
        self.ready: list[Any] = []  # per process, an Event it sets once it serves
        self.restarts: list[Restarts] = []
        self.request_sockets: dict[int, socket.socket] = {}
        self._context = multiprocessing.get_context("spawn")

    def _spawn(self, role: Role, index: int) -> tuple[BaseProcess, Any]:
        # An events worker serves nothing anyone calls: its own socket only runs the lifespans.
        sock = self._request_socket(index) if role is REQUESTS else listening_socket("127.0.0.1", 0)
        overrides = {**self.overrides, "run_listeners": role.listens}
        if "TICKETING_DB_POOL_SIZE" not in os.environ:
            overrides["db_pool_size"] = self.pool_sizes[role]
        ready = self._context.Event()
        process = self._context.Process(
            target=worker_main,
            args=(os.getpid(), sock, self.log_level, overrides, ROLES.index(role), ready),
            name=f"ticketing-{role.name}",
        )
        process.start()
        if sock not in self.request_sockets.values():
            sock.close()  # the child has its own copy
        return process, ready

    def _request_socket(self, index: int) -> socket.socket:
        """The listening socket of the request worker at `index`, kept for whoever takes its
        place: one of its own on the port. On one shared socket, a burst of new connections
        (a rush's buyers) went to whichever worker woke first, which took all that waited:
        12 of 16 on one worker, whose loop and pools then made the rush's slowest answers.
        The kernel spreads them over sockets of their own (9 to 7)."""
        if index not in self.request_sockets:
            first = not self.request_sockets
            self.request_sockets[index] = self.sock if first else joining_socket(self.sock)
        return self.request_sockets[index]

    def start(self, request_workers: int) -> None:
        self.roles = [*EVENT_ROLES, *[REQUESTS] * request_workers]
        self.pool_sizes = pool_sizes(self.roles)
        spawned = [self._spawn(role, index) for index, role in enumerate(self.roles)]
        self.processes = [process for process, _ready in spawned]
        self.ready = [ready for _process, ready in spawned]
        self.restarts = [Restarts() for _ in spawned]

    def replace_dead(self) -> None:
        now = time.monotonic()
        for index, process in enumerate(self.processes):
            if process.is_alive():
                continue
            restarts, name = self.restarts[index], self.roles[index].name
            if restarts.due is None:  # found dead just now
                # An exit status, not a signal (negative), before serving: start-up failed.
                start_failed = not self.ready[index].is_set() and (process.exitcode or 0) > 0
                pause = restarts.died(start_failed, now)
                if start_failed:
                    log.warning("%s worker exited with %s before it served; another in %.0f s",
                                name, process.exitcode, pause)  # fmt: skip
                else:
                    log.warning("%s worker exited with %s; starting another",
                                name, process.exitcode)  # fmt: skip
            if restarts.start_now(now):
                self.processes[index], self.ready[index] = self._spawn(self.roles[index], index)

    def serving(self) -> bool:
        """Whether every worker has started: its services' start-up done, serving."""
        return all(ready.is_set() for ready in self.ready)

    def probe(self, index: int) -> Any:
        def state() -> str:
            process = self.processes[index]
            if not process.is_alive():
                return "stopped"
            started = "running" if self.ready[index].is_set() else "starting"
            return f"{started} (pid {process.pid})"

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
        for sock in self.request_sockets.values():
            if sock is not self.sock:  # that one is its opener's to close
                sock.close()


async def _watch(
    pool: WorkerPool, stop: asyncio.Event, board: Any, console: Console, announcement: str
) -> None:
    """Keep the workers running until asked to stop; the platform is announced once every
    worker serves (as `ticketing up` in one process announces once it serves)."""
    live: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if console.is_terminal:
        live = Live(board.render(), console=console, refresh_per_second=1)
    announced = False
    with live:
        while not stop.is_set():
            if not announced and pool.serving():
                if not isinstance(live, Live):
                    console.print(board.render())
                console.print(announcement)
                announced = True
            with contextlib.suppress(TimeoutError):
                # Often until announced, so that the announcement follows the start closely.
                await asyncio.wait_for(stop.wait(), timeout=1.0 if announced else 0.05)
            if not stop.is_set():
                pool.replace_dead()
            if isinstance(live, Live):
                live.update(board.render())


def serve_worker(
    sock: socket.socket, log_level: str, overrides: dict[str, Any], role_index: int, ready: Any
) -> None:
    """One worker process (started by lifeline.worker_main): every service behind the gateway,
    on the socket it was given; `ready` is set once it serves."""
    role = ROLES[role_index]
    configure_logging(json_lines=False, level=log_level)
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    if role.niceness:
        change_priority(role.niceness)
    # An events worker builds only the services it handles events of: nobody calls it.
    specs = [spec for spec in SERVICES.values() if not role.listens or role.runs(spec.name)]
    services = {spec.name: spec.create_app(**overrides) for spec in specs}
    routes = [(SERVICES[name].prefix, app) for name, app in services.items()]
    tune_for_serving()
    config = server_config(Gateway(routes, services), log_level)
    # uvicorn's own loop choice (uvloop when installed), as `uvicorn.Server.run` makes it.
    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(_serve(uvicorn.Server(config), sock, ready))


def change_priority(niceness: int) -> int:
    """Run this process `niceness` steps below its CPU priority (above it, if negative and
    allowed); returns the niceness it runs at."""
    try:
        return os.nice(niceness)
    except PermissionError:
        log.info("no privilege to raise this worker's CPU priority; it runs at the default")
        return os.nice(0)


async def _serve(server: uvicorn.Server, sock: socket.socket, ready: Any) -> None:
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    if await until_started(server, serving):
        ready.set()
    await serving
