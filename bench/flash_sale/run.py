"""The whole run: the ceiling's rush, then the platform's setup, rush, payments and expiry."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from functools import partial

import asyncpg
import jwt
from rich.console import Console

from bench.ceiling.app import SCHEMA
from bench.flash_sale.api import Api, ApiError, bounded, client
from bench.flash_sale.chaos import (
    ROLES,
    Chaos,
    ChaosResult,
    ConnectionDropper,
    WorkerKiller,
    drained,
)
from bench.flash_sale.checks import check
from bench.flash_sale.config import Config
from bench.flash_sale.convergence import ConvergenceWatcher, EventClock
from bench.flash_sale.phases import (
    ExpiryResult,
    People,
    expire,
    list_tickets,
    pay,
    price,
    replicated,
    sign_up,
)
from bench.flash_sale.relay import Relay
from bench.flash_sale.report import Report, Target
from bench.flash_sale.rush import RushResult, rush
from bench.flash_sale.servers import (
    Ceiling,
    CpuMeter,
    Platform,
    database_url,
    new_jwt_key,
    reset,
    service_dsn,
)

RUSH_TTL_SECONDS = 900  # the contract's window: no order of the rush expires before it is paid
CONVERGENCE_TIMEOUT = 30.0
DRAIN_TIMEOUT = 60.0  # with workers killed: until every consumer has caught up
PAY_TIMEOUT = 120.0
EXPIRY_TIMEOUT = 30.0
EXPIRY_JOBS_HANDED_ON_SECONDS = 30.0  # with its events workers killed, see _expiry
WARM_UP_REQUESTS = 200
# A platform at rest (sweeps, the job queue's polls) uses a few percent of a core.
QUIET_SHARE = 0.1
QUIET_SECONDS = 0.2
QUIET_TIMEOUT = 10.0


def main(config: Config, console: Console | None = None) -> int:
    """Run, report; exit status 1 when anything was oversold, lost or answered with a 5xx."""
    console = console or Console()
    report = asyncio.run(run(config, console))
    report.print(console)
    if config.json_path:
        report.write_json(config.json_path)
        console.print(f"JSON: {config.json_path}")
    report.chart(config.chart)
    console.print(f"chart: {config.chart}")
    problems = report.failed()
    for problem in problems:
        console.print(f"[red]FAILED: {problem}[/]")
    return 1 if problems else 0


@contextmanager
def phase(console: Console, name: str) -> Iterator[None]:
    began = time.perf_counter()
    with console.status(f"{name}..."):
        yield
    console.print(f"[green]done[/] {name} ({time.perf_counter() - began:.1f}s)")


class Meter:
    """CPU per part over a phase, with the target's own process tree as one part."""

    def __init__(self) -> None:
        self.cpu = CpuMeter()

    @contextmanager
    def measure(
        self, target: str, sample: Callable[[], dict[int, float]]
    ) -> Iterator[dict[str, float]]:
        self.cpu.parts[target] = sample
        spent: dict[str, float] = {}
        before = self.cpu.snapshot()
        yield spent
        spent.update(CpuMeter.spent(before, self.cpu.snapshot()))
        del self.cpu.parts[target]


async def run(config: Config, console: Console) -> Report:
    config.out_dir.mkdir(parents=True, exist_ok=True)
    jwt_key = new_jwt_key()
    meter = Meter()
    with phase(console, "fresh databases, stream and queue"):
        await reset(config)
    ceiling = CeilingSide(Ceiling(config, jwt_key)) if config.ceiling else None
    async with contextlib.AsyncExitStack() as relays:
        platform = Platform(config, jwt_key, await _relays(config, relays))
        try:
            if ceiling is not None:
                await _start_ceiling(config, jwt_key, ceiling, console)
            with phase(console, f"starting the platform ({config.workers} workers)"):
                await platform.start(RUSH_TTL_SECONDS)
            return await _platform_run(config, platform, meter, console, ceiling)
        finally:
            platform.stop()
            if ceiling is not None:
                ceiling.server.stop()


async def _relays(config: Config, stack: contextlib.AsyncExitStack) -> dict[str, Relay]:
    """With connections dropped: the relays through which the platform reaches NATS and Redis
    (the benchmark's own connections go straight to them)."""
    if config.drop_connections_every is None or config.url is not None:
        return {}
    servers = {"NATS": config.nats_url, "Redis": config.redis_url}
    return {name: await stack.enter_async_context(Relay(url)) for name, url in servers.items()}


@dataclass
class CeilingSide:
    """The ceiling's server, tickets and buyers' tokens, running beside the platform; its
    client during the rush."""

    server: Ceiling
    ticket_ids: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    api: Api | None = None


async def _platform_run(
    config: Config, platform: Platform, meter: Meter, console: Console, ceiling: CeilingSide | None
) -> Report:
    notes: list[str] = []
    async with client(config.buyers) as http, client(config.buyers) as ceiling_http:
        api = Api(http, platform.url)
        with phase(
            console,
            f"setup: {config.sellers} sellers list {config.tickets} tickets, "
            f"{config.buyers} buyers sign up",
        ):
            people = await sign_up(api, secrets.token_hex(4), config.sellers, config.buyers)
            ticket_ids = await list_tickets(api, people.sellers, config.tickets, "Flash")
            await replicated(service_dsn(config, "orders"), ticket_ids)
            await _warm_up_orders(api, people.sellers, ticket_ids, config.buyers)
        async with ConvergenceWatcher(config.nats_url, config.subject_prefix) as watcher:
            if ceiling is not None:
                ceiling.api = Api(ceiling_http, ceiling.server.url)
            turns = Turns(
                config, meter, watcher, ceiling, _chaos(config, platform, _killer(config, platform))
            )
            with phase(console, turns.title):
                target, ceiling_target = await turns.rush(api, people.buyers, ticket_ids, platform)
            if ceiling is not None:
                ceiling.server.stop()  # its part is over; the pay phase is the platform's alone
            with phase(console, "convergence: every order reserved by the tickets service"):
                lags, missing = await watcher.lags(target.rush.wins, CONVERGENCE_TIMEOUT)
        chaos = await _after_faults(config, turns.chaos, console)
        with phase(console, f"pay: {len(target.rush.wins)} orders with tok_visa"):
            paid = await pay(api, people.buyers, target.rush.wins, PAY_TIMEOUT)
    expiry, expiry_faults = await _expiry(config, platform, people, console, notes)
    if chaos is not None and expiry_faults is not None:
        chaos.expiry_kills = expiry_faults.kills
        chaos.expiry_drops = expiry_faults.drops
        chaos.expiry_cut = expiry_faults.cut
    with phase(console, "checks in every service's database"):
        checks = await check(config)
    settings = {
        k: str(v) if not isinstance(v, int | str | bool) else v
        for k, v in dataclasses.asdict(config).items()
    }
    return Report(
        settings, target, ceiling_target, lags, missing, paid, expiry, checks, notes, chaos
    )


def _killer(
    config: Config, platform: Platform, roles: tuple[str, ...] = ROLES, most: int | None = None
) -> WorkerKiller | None:
    if config.kill_every is None or platform.child is None:
        return None
    pid, every = platform.child.process.pid, config.kill_every
    return WorkerKiller(pid, platform.port, every, roles, most)


def _dropper(config: Config, platform: Platform) -> ConnectionDropper | None:
    if config.drop_connections_every is None:
        return None
    admin = f"{config.postgres_url}/postgres"
    every = config.drop_connections_every
    return ConnectionDropper(admin, config.databases, every, platform.relays)


def _chaos(config: Config, platform: Platform, killer: WorkerKiller | None) -> Chaos | None:
    if not config.chaos or not platform.managed:
        return None
    return Chaos(killer, _dropper(config, platform))


async def _after_faults(
    config: Config, chaos: Chaos | None, console: Console
) -> ChaosResult | None:
    """After a rush with faults: until every consumer has caught up (what a killed worker had
    fetched comes back after the ack wait), so that the pay phase finds every order."""
    if chaos is None:
        return None
    with phase(console, "after the rush's faults, every consumer catches up"):
        caught_up = await drained(config.nats_url, config.stream, DRAIN_TIMEOUT)
    return chaos.result(caught_up)


class Turns:
    """The rush in rounds: the ceiling on a slice of its tickets, then the platform on a slice
    of its own, and again. A shared machine's speed drifts by a third within minutes; in turns,
    both see the same drift, and the ratio of their speeds keeps only what differs.

    The platform's turn ends once its orders are reserved and it is quiet again (the replicas,
    marks and jobs that follow are done): the ceiling's next turn then has the cores to itself.
    That wait counts in the platform's CPU, not in its rush's duration (as after a single rush,
    the last moment's events are handled after it)."""

    def __init__(
        self,
        config: Config,
        meter: Meter,
        watcher: ConvergenceWatcher,
        ceiling: CeilingSide | None,
        chaos: Chaos | None = None,
    ) -> None:
        self.config = config
        self.meter = meter
        self.watcher = watcher
        self.ceiling = ceiling
        self.chaos = chaos  # the faults during the platform's turns

    @property
    def title(self) -> str:
        who = "ceiling and platform in turns" if self.ceiling else "the platform"
        faults = f", {self.chaos.describe()}" if self.chaos else ""
        return f"rush: {self.config.buyers} buyers, {who}, {self.config.rounds} rounds{faults}"

    async def rush(
        self, api: Api, tokens: list[str], ticket_ids: list[str], platform: Platform
    ) -> tuple[Target, Target | None]:
        ours = Target("platform", RushResult(), {})
        ceiling, rounds = self.ceiling, self.config.rounds
        theirs = Target("ceiling", RushResult(), {}) if ceiling else None
        for turn in range(rounds):
            if ceiling is not None and ceiling.api is not None and theirs is not None:
                mine = _slice(ceiling.ticket_ids, turn, rounds)
                await self._turn(theirs, ceiling.api, ceiling.tokens, mine, ceiling.server.cpu)
            ids = _slice(ticket_ids, turn, rounds)
            await self._turn(
                ours, api, tokens, ids, platform.cpu, settle=self._settled, chaos=self.chaos
            )
        return ours, theirs

    async def _turn(
        self,
        target: Target,
        api: Api,
        tokens: list[str],
        ticket_ids: list[str],
        cpu_of: Callable[[], dict[int, float]],
        settle: Callable[[RushResult, Callable[[], dict[int, float]]], Awaitable[None]]
        | None = None,
        chaos: Chaos | None = None,
    ) -> None:
        with self.meter.measure(target.name, cpu_of) as cpu:
            async with chaos or contextlib.nullcontext():
                result = await rush(api, tokens, ticket_ids, hot=self.config.hot)
            if settle is not None:
                await settle(result, cpu_of)
        target.add(result, cpu)

    async def _settled(self, result: RushResult, cpu_of: Callable[[], dict[int, float]]) -> None:
        sold: set[Hashable] = {(w.ticket_id, w.order_id) for w in result.wins}
        await self.watcher.wait_for(sold, CONVERGENCE_TIMEOUT)
        await _quiet(cpu_of)


async def _quiet(sample: Callable[[], dict[int, float]]) -> None:
    """Until the processes sampled use less than QUIET_SHARE of a core over QUIET_SECONDS (the
    replicas, marks and jobs that follow a turn's sales are done), or QUIET_TIMEOUT passed."""
    deadline = time.monotonic() + QUIET_TIMEOUT
    spent, at = sum(sample().values()), time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(QUIET_SECONDS)
        now_spent, now = sum(sample().values()), time.monotonic()
        if (now_spent - spent) / (now - at) < QUIET_SHARE:
            return
        spent, at = now_spent, now


def _slice(ids: list[str], turn: int, rounds: int) -> list[str]:
    """The turn-th of `rounds` slices, in listing order (the best seats go first)."""
    size = -(-len(ids) // rounds)
    return ids[turn * size : (turn + 1) * size]


async def _expiry(
    config: Config, platform: Platform, people: People, console: Console, notes: list[str]
) -> tuple[ExpiryResult | None, Chaos | None]:
    """The expiry phase, on a platform restarted with a short window; with faults, they go on
    while the orders fall due: its events workers (the expiry jobs, the cancellations) are
    killed, its connections dropped."""
    if platform.managed:
        with phase(console, f"restart with a {config.expiry_ttl_seconds}s reservation window"):
            platform.stop()
            await platform.start(config.expiry_ttl_seconds)
    cancelled = EventClock(
        config.nats_url, f"{config.subject_prefix}.order.cancelled", lambda data: data["id"]
    )
    # Each events worker once: arq gives the jobs a killed worker held to another only once
    # their in-progress mark has lapsed (the job timeout and a second), so each kill delays
    # them by that much.
    killer = _killer(config, platform, roles=("events",), most=2)
    chaos = _chaos(config, platform, killer)
    within = EXPIRY_TIMEOUT + (EXPIRY_JOBS_HANDED_ON_SECONDS if killer else 0)
    async with client(config.buyers) as http, cancelled:
        api = Api(http, platform.url)
        with phase(console, f"expiry: {config.expiring} orders left unpaid"):
            orders_dsn = service_dsn(config, "orders")
            expiry = await expire(
                api, people, config.expiring, within, orders_dsn, cancelled, chaos
            )
    if expiry is None:
        notes.append(
            "expiry phase skipped: the running platform's reservation window is long; "
            "start it with a short TICKETING_ORDER_TTL_SECONDS to measure it"
        )
    return expiry, chaos


async def _start_ceiling(
    config: Config, jwt_key: str, ceiling: CeilingSide, console: Console
) -> None:
    with phase(console, f"ceiling setup: {config.tickets} tickets, {config.buyers} buyers"):
        ceiling.ticket_ids, ceiling.tokens = await _ceiling_data(config, jwt_key)
        await ceiling.server.start()
        async with client(config.buyers) as http:
            api = Api(http, ceiling.server.url)
            # Warm every worker's connection pool, as _warm_up_orders warms the platform's.
            tokens = ceiling.tokens
            warm_up = [
                partial(api.call, "POST", "/api/orders", tokens[i % len(tokens)],
                        {"ticketId": str(uuid.uuid4())})
                for i in range(WARM_UP_REQUESTS)
            ]  # fmt: skip
            await bounded(config.buyers, warm_up)


async def _warm_up_orders(
    api: Api, sellers: list[str], ticket_ids: list[str], concurrency: int
) -> None:
    """Warm the orders service's pools and hot path as the ceiling's warm-up warms its own (the
    setup's sign-ups and listings never reach orders): sellers try to buy the tickets they
    listed, each attempt read and refused, nothing ordered."""
    listed = [i % len(ticket_ids) for i in range(WARM_UP_REQUESTS)]  # list_tickets' order
    attempts = [
        partial(api.call, "POST", "/api/orders", sellers[i % len(sellers)],
                {"ticketId": ticket_ids[i]})
        for i in listed
    ]  # fmt: skip
    refused = [status for status, _ in await bounded(concurrency, attempts) if status != 400]
    if refused:
        raise ApiError(f"warming up: a seller's own ticket answered {sorted(set(refused))}")


async def _ceiling_data(config: Config, jwt_key: str) -> tuple[list[str], list[str]]:
    """The ceiling's tickets straight into its table, and session tokens for its buyers."""
    sellers = [str(uuid.uuid4()) for _ in range(config.sellers)]
    tickets = [
        (
            str(uuid.uuid4()),
            f"Flash seat {i + 1}",
            Decimal(str(price(i))),
            sellers[i % len(sellers)],
            0,
        )
        for i in range(config.tickets)
    ]
    conn = await asyncpg.connect(database_url(config, "ceiling"))
    try:
        await conn.execute(SCHEMA)
        await conn.copy_records_to_table(
            "tickets", records=tickets, columns=["id", "title", "price", "user_id", "version"]
        )
    finally:
        await conn.close()
    now = int(time.time())
    tokens = [
        jwt.encode(
            {
                "id": str(uuid.uuid4()),
                "email": f"buyer{i}@bench.example.com",
                "iat": now,
                "exp": now + 3600,
            },
            jwt_key,
            algorithm="HS256",
        )
        for i in range(config.buyers)
    ]
    return [t[0] for t in tickets], tokens
