"""Convergence lag: from an order's 201 until the tickets service has reserved the ticket.

The tickets service announces a reservation with ticket:updated (orderId set), published from
its outbox after the reservation commits; the watcher listens on that subject, so the lag it
reports is an upper bound of when GET /api/tickets/{id} first shows the ticket reserved.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import nats

from bench.flash_sale.rush import Win


class ConvergenceWatcher:
    def __init__(self, nats_url: str, subject_prefix: str) -> None:
        self.nats_url = nats_url
        self.subject = f"{subject_prefix}.ticket.updated"
        self.reserved: dict[tuple[str, str], float] = {}  # (ticket, order) -> perf_counter
        self._nc: Any = None

    async def __aenter__(self) -> ConvergenceWatcher:
        self._nc = await nats.connect(self.nats_url)
        await self._nc.subscribe(self.subject, cb=self._seen)
        await self._nc.flush()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self._nc.close()

    async def _seen(self, msg: Any) -> None:
        at = time.perf_counter()
        data = json.loads(msg.data)["data"]
        if data.get("orderId"):
            self.reserved.setdefault((data["id"], data["orderId"]), at)

    async def lags(self, wins: list[Win], within: float) -> tuple[list[float], int]:
        """Seconds from each 201 to its reservation; waits up to `within` for stragglers and
        returns how many never converged."""
        deadline = time.monotonic() + within
        pending = [w for w in wins if (w.ticket_id, w.order_id) not in self.reserved]
        while pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            pending = [w for w in pending if (w.ticket_id, w.order_id) not in self.reserved]
        lags = [
            max(self.reserved[(w.ticket_id, w.order_id)] - w.at, 0.0)
            for w in wins
            if (w.ticket_id, w.order_id) in self.reserved
        ]
        return lags, len(pending)
