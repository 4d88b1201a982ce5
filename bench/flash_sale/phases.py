"""Setup, the pay phase and the expiry phase, through the public API."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial

import asyncpg

from bench.flash_sale.api import Api, ApiError, bounded
from bench.flash_sale.convergence import EventClock
from bench.flash_sale.rush import Win

SETUP_CONCURRENCY = 16
POLL_SECONDS = 0.05  # how often buyers re-read their orders: when the pay phase is seen to end
PASSWORD = "flash-sale"
MAX_EXPIRY_WAIT_SECONDS = 120.0


@dataclass
class People:
    sellers: list[str] = field(default_factory=list)  # session tokens
    buyers: list[str] = field(default_factory=list)


async def sign_up(api: Api, run: str, sellers: int, buyers: int) -> People:
    async def one(role: str, index: int) -> str:
        return await api.signup(f"{role}{index}-{run}@bench.example.com", PASSWORD)

    people = People()
    people.sellers = await bounded(
        SETUP_CONCURRENCY, [partial(one, "seller", i) for i in range(sellers)]
    )
    people.buyers = await bounded(
        SETUP_CONCURRENCY, [partial(one, "buyer", i) for i in range(buyers)]
    )
    return people


async def list_tickets(api: Api, sellers: list[str], count: int, label: str) -> list[str]:
    """Sellers take turns listing `count` tickets; ids in listing order (best seats first)."""
    calls = [
        partial(api.create_ticket, sellers[i % len(sellers)], f"{label} seat {i + 1}", price(i))
        for i in range(count)
    ]
    return await bounded(SETUP_CONCURRENCY, calls)


def price(index: int) -> float:
    """Prices spread over a range, the same for the platform's and the ceiling's tickets."""
    return round(20 + (index % 50) * 1.5, 2)


async def wait_until(
    probe: Callable[[], Awaitable[bool]], within: float, what: str, poll: float = 0.1
) -> float:
    """Poll until `probe` holds; returns the seconds it took. Raises on the deadline."""
    began = time.monotonic()
    while not await probe():
        if time.monotonic() - began > within:
            raise TimeoutError(f"{what}: not within {within:.0f}s")
        await asyncio.sleep(poll)
    return time.monotonic() - began


async def replicated(dsn: str, ticket_ids: list[str], within: float = 60.0) -> None:
    """Until the orders service knows every ticket (its replica fills from ticket:created)."""
    conn = await asyncpg.connect(dsn)
    try:

        async def all_known() -> bool:
            known = await conn.fetchval(
                "SELECT count(*) FROM tickets WHERE id = ANY($1::varchar[])", ticket_ids
            )
            return bool(known == len(ticket_ids))

        await wait_until(all_known, within, "the orders service's replica of the tickets")
    finally:
        await conn.close()


@dataclass
class PayResult:
    statuses: list[int]
    latencies: list[float]
    seconds_to_complete: float
    incomplete: int


async def pay(api: Api, buyers: list[str], wins: list[Win], within: float) -> PayResult:
    """Every winner pays with tok_visa; timed until every order reads complete."""
    began = time.perf_counter()

    async def one(win: Win) -> tuple[int, float]:
        start = time.perf_counter()
        status, _ = await api.call(
            "POST",
            "/api/payments",
            buyers[win.buyer],
            {"orderId": win.order_id, "token": "tok_visa"},
        )
        return status, time.perf_counter() - start

    answers = await bounded(len(buyers), [partial(one, w) for w in wins])
    wanted = {w.order_id for w in wins}
    incomplete = await _await_status(api, buyers, wanted, "complete", within)
    return PayResult(
        statuses=[s for s, _ in answers],
        latencies=[t for _, t in answers],
        seconds_to_complete=time.perf_counter() - began,
        incomplete=len(incomplete),
    )


async def _await_status(
    api: Api,
    buyers: list[str],
    order_ids: set[str],
    status: str,
    within: float,
) -> set[str]:
    """Buyers re-read their orders until every one of `order_ids` has `status`; returns those
    that never got there."""
    pending = set(order_ids)
    deadline = time.monotonic() + within
    while pending and time.monotonic() < deadline:
        pages = await asyncio.gather(*(api.my_orders(token) for token in buyers))
        for order in (o for page in pages for o in page):
            if order["id"] in pending and order["status"] == status:
                pending.discard(order["id"])
        if pending:
            await asyncio.sleep(POLL_SECONDS)
    return pending


@dataclass
class ExpiryResult:
    lateness: list[float]  # seconds from expiresAt until the order read cancelled
    not_cancelled: int
    not_relisted: int
    ttl_seconds: float


async def expire(
    api: Api,
    people: People,
    count: int,
    within: float,
    orders_dsn: str,
    cancelled: EventClock,
    while_due: AbstractAsyncContextManager[object] | None = None,
) -> ExpiryResult | None:
    """Orders left unpaid: each must be cancelled soon after its expiresAt, and its ticket must
    be back for sale.

    The time of cancellation is when order:cancelled is seen on NATS (`cancelled` listens):
    the orders service publishes it after the cancellation commits, so it is an upper bound of
    when the order first reads cancelled, without buyers hammering the API to find out. Every
    order is then read once through the API to check that it is cancelled. `while_due` is
    entered from the moment every order is placed until each is seen cancelled."""
    ticket_ids = await list_tickets(api, people.sellers, count, "Encore")
    await replicated(orders_dsn, ticket_ids)
    buyers = people.buyers
    owner = {t: buyers[i % len(buyers)] for i, t in enumerate(ticket_ids)}
    orders = [partial(api.call, "POST", "/api/orders", owner[t], {"ticketId": t}) for t in owner]
    created = await bounded(SETUP_CONCURRENCY, orders)
    for status, body in created:
        if status != 201:
            raise ApiError(f"an order for the expiry phase: {status} {body}")
    # expiresAt on the perf_counter clock the event clock uses
    offset = time.perf_counter() - time.time()
    expires = {body["id"]: _epoch(body["expiresAt"]) + offset for _, body in created}
    ttl = max(expires.values()) - time.perf_counter()
    if ttl > MAX_EXPIRY_WAIT_SECONDS:  # a platform with a long window: give the tickets back
        buyer_of = {body["id"]: owner[body["ticket"]["id"]] for _, body in created}
        await bounded(SETUP_CONCURRENCY, [
            partial(api.call, "DELETE", f"/api/orders/{o}", buyer_of[o]) for o in expires
        ])  # fmt: skip
        return None
    async with while_due or contextlib.nullcontext():
        await cancelled.wait_for(set(expires), ttl + within)
    seen_at = {o: cancelled.seen[o] for o in expires if o in cancelled.seen}
    not_cancelled = await _await_status(api, buyers, set(expires), "cancelled", within)

    async def relisted() -> bool:
        listed = {t["id"] for t in await api.listing()}
        return all(t in listed for t in ticket_ids)

    try:
        await wait_until(relisted, within, "expired tickets back for sale", poll=POLL_SECONDS)
        not_relisted = 0
    except TimeoutError:
        listed = {t["id"] for t in await api.listing()}
        not_relisted = sum(1 for t in ticket_ids if t not in listed)
    return ExpiryResult(
        lateness=[max(seen_at[o] - expires[o], 0.0) for o in seen_at],
        not_cancelled=len(not_cancelled | (set(expires) - seen_at.keys())),
        not_relisted=not_relisted,
        ttl_seconds=ttl,
    )


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
