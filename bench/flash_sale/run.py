"""The whole run: the ceiling's rush, then the platform's setup, rush, payments and expiry."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from functools import partial

import asyncpg
import jwt
from rich.console import Console

from bench.ceiling.app import SCHEMA
from bench.flash_sale.api import Api, bounded, client
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
from bench.flash_sale.report import Report, Target
from bench.flash_sale.rush import rush
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
PAY_TIMEOUT = 120.0
EXPIRY_TIMEOUT = 30.0
WARM_UP_REQUESTS = 200


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
    ceiling = None
    if config.ceiling:
        ceiling = await _ceiling_rush(config, jwt_key, meter, console)
    platform = Platform(config, jwt_key)
    try:
        with phase(console, f"starting the platform ({config.workers} workers)"):
            await platform.start(RUSH_TTL_SECONDS)
        return await _platform_run(config, platform, meter, console, ceiling)
    finally:
        platform.stop()


async def _platform_run(
    config: Config, platform: Platform, meter: Meter, console: Console, ceiling: Target | None
) -> Report:
    notes: list[str] = []
    async with client(config.buyers) as http:
        api = Api(http, platform.url)
        with phase(
            console,
            f"setup: {config.sellers} sellers list {config.tickets} tickets, "
            f"{config.buyers} buyers sign up",
        ):
            people = await sign_up(api, secrets.token_hex(4), config.sellers, config.buyers)
            ticket_ids = await list_tickets(api, people.sellers, config.tickets, "Flash")
            await replicated(service_dsn(config, "orders"), ticket_ids)
        async with ConvergenceWatcher(config.nats_url, config.subject_prefix) as watcher:
            with (
                phase(console, f"rush: {config.buyers} buyers on the platform"),
                meter.measure("platform", platform.cpu) as cpu,
            ):
                result = await rush(api, people.buyers, ticket_ids, hot=config.hot)
            with phase(console, "convergence: every order reserved by the tickets service"):
                lags, missing = await watcher.lags(result.wins, CONVERGENCE_TIMEOUT)
        target = Target("platform", result, cpu)
        with phase(console, f"pay: {len(result.wins)} orders with tok_visa"):
            paid = await pay(api, people.buyers, result.wins, PAY_TIMEOUT)
    expiry = await _expiry(config, platform, people, console, notes)
    with phase(console, "checks in every service's database"):
        checks = await check(config)
    settings = {
        k: str(v) if not isinstance(v, int | str | bool) else v
        for k, v in dataclasses.asdict(config).items()
    }
    return Report(settings, target, ceiling, lags, missing, paid, expiry, checks, notes)


async def _expiry(
    config: Config, platform: Platform, people: People, console: Console, notes: list[str]
) -> ExpiryResult | None:
    if platform.managed:
        with phase(console, f"restart with a {config.expiry_ttl_seconds}s reservation window"):
            platform.stop()
            await platform.start(config.expiry_ttl_seconds)
    cancelled = EventClock(
        config.nats_url, f"{config.subject_prefix}.order.cancelled", lambda data: data["id"]
    )
    async with client(config.buyers) as http, cancelled:
        api = Api(http, platform.url)
        with phase(console, f"expiry: {config.expiring} orders left unpaid"):
            orders_dsn = service_dsn(config, "orders")
            expiry = await expire(
                api, people, config.expiring, EXPIRY_TIMEOUT, orders_dsn, cancelled
            )
    if expiry is None:
        notes.append(
            "expiry phase skipped: the running platform's reservation window is long; "
            "start it with a short TICKETING_ORDER_TTL_SECONDS to measure it"
        )
    return expiry


async def _ceiling_rush(config: Config, jwt_key: str, meter: Meter, console: Console) -> Target:
    with phase(console, f"ceiling setup: {config.tickets} tickets, {config.buyers} buyers"):
        ticket_ids, tokens = await _ceiling_data(config, jwt_key)
        ceiling = Ceiling(config, jwt_key)
        await ceiling.start()
    try:
        async with client(config.buyers) as http:
            api = Api(http, ceiling.url)
            # Warm every worker's connection pool, as the platform's setup warms its own.
            warm_up = [
                partial(
                    api.call,
                    "POST",
                    "/api/orders",
                    tokens[i % len(tokens)],
                    {"ticketId": str(uuid.uuid4())},
                )
                for i in range(WARM_UP_REQUESTS)
            ]
            await bounded(config.buyers, warm_up)
            with (
                phase(console, f"rush: {config.buyers} buyers on the ceiling"),
                meter.measure("ceiling", ceiling.cpu) as cpu,
            ):
                result = await rush(api, tokens, ticket_ids, hot=config.hot)
    finally:
        ceiling.stop()
    return Target("ceiling", result, cpu)


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
