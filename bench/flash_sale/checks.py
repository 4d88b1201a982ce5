"""After the run, straight from every service's database: was anything oversold or lost?"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import asyncpg

from bench.flash_sale.config import Config
from bench.flash_sale.servers import SERVICES_WITH_DB, service_dsn

SETTLE_SECONDS = 30.0


@dataclass
class Checks:
    oversold: int  # tickets held by more than one active/complete order, by any service's account
    disagreements: int  # tickets whose holder the tickets and orders services see differently
    double_charges: int  # orders charged more than once
    unpublished: int  # outbox rows never published, in any service
    dead_letters: int  # events a service gave up on

    @property
    def lost_events(self) -> int:
        return self.disagreements + self.unpublished + self.dead_letters


async def check(config: Config) -> Checks:
    """Wait (bounded) for the services to agree, then count what is wrong."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        result = await _count(config)
        settled = not (result.disagreements or result.unpublished)
        if settled or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.2)


async def _count(config: Config) -> Checks:
    conns = {s: await asyncpg.connect(service_dsn(config, s)) for s in SERVICES_WITH_DB}
    try:
        orders, tickets, payments = conns["orders"], conns["tickets"], conns["payments"]
        oversold = await orders.fetchval(
            "SELECT count(*) FROM (SELECT ticket_id FROM orders WHERE status <> 'cancelled'"
            " GROUP BY ticket_id HAVING count(*) > 1) AS held_twice"
        )
        oversold += await payments.fetchval(
            "SELECT count(*) FROM (SELECT o.ticket_id FROM payments p JOIN orders o"
            " ON o.id = p.order_id WHERE p.refund_id IS NULL"
            " GROUP BY o.ticket_id HAVING count(DISTINCT o.id) > 1) AS paid_twice"
        )
        double_charges = await payments.fetchval(
            "SELECT count(*) FROM (SELECT order_id FROM payments WHERE refund_id IS NULL"
            " GROUP BY order_id HAVING count(*) > 1) AS charged_twice"
        )
        holders = {
            r["ticket_id"]: (r["id"], r["status"] == "complete")
            for r in await orders.fetch(
                "SELECT ticket_id, id, status FROM orders WHERE status <> 'cancelled'"
            )
        }
        seen = {
            r["id"]: (r["order_id"], r["sold"])
            for r in await tickets.fetch("SELECT id, order_id, sold FROM tickets")
        }
        disagreements = sum(
            1
            for ticket, (order, sold) in seen.items()
            if holders.get(ticket, (None, False)) != (order, sold)
        )
        unpublished = dead = 0
        for conn in conns.values():
            unpublished += await conn.fetchval(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL"
            )
            dead += await conn.fetchval("SELECT count(*) FROM dead_letters")
        return Checks(oversold, disagreements, double_charges, unpublished, dead)
    finally:
        for conn in conns.values():
            await conn.close()
