"""Convergence lag: from an order's 201 until the tickets service has reserved the ticket.

The tickets service announces a reservation with ticket:updated (orderId set), published from
its outbox after the reservation commits; the watcher listens on that subject, so the lag it
reports is an upper bound of when GET /api/tickets/{id} first shows the ticket reserved.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Hashable
from typing import Any, Self

import nats

from bench.flash_sale.rush import Win


class EventClock:
    """When each event on one subject was first seen (perf_counter), by a key from its data."""

    def __init__(
        self, nats_url: str, subject: str, key: Callable[[dict[str, Any]], Hashable | None]
    ) -> None:
        self.nats_url = nats_url
        self.subject = subject
        self.key = key
        self.seen: dict[Hashable, float] = {}
        self._nc: Any = None

    async def __aenter__(self) -> Self:
        self._nc = await nats.connect(self.nats_url)
        await self._nc.subscribe(self.subject, cb=self._seen)
        await self._nc.flush()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self._nc.close()

    async def _seen(self, msg: Any) -> None:
        at = time.perf_counter()
        key = self.key(json.loads(msg.data)["data"])
        if key is not None:
            self.seen.setdefault(key, at)

    async def wait_for(self, keys: set[Hashable], within: float) -> set[Hashable]:
        """Wait up to `within` seconds for every key; returns those never seen."""
        deadline = time.monotonic() + within
        pending = keys - self.seen.keys()
        while pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            pending -= self.seen.keys()
        return pending


def _reservation(data: dict[str, Any]) -> tuple[str, str] | None:
    return (data["id"], data["orderId"]) if data.get("orderId") else None


class ConvergenceWatcher(EventClock):
    def __init__(self, nats_url: str, subject_prefix: str) -> None:
        super().__init__(nats_url, f"{subject_prefix}.ticket.updated", _reservation)

    async def lags(self, wins: list[Win], within: float) -> tuple[list[float], int]:
        """Seconds from each 201 to its reservation; waits up to `within` for stragglers and
        returns how many never converged."""
        missing = await self.wait_for({(w.ticket_id, w.order_id) for w in wins}, within)
        lags = [
            max(self.seen[(w.ticket_id, w.order_id)] - w.at, 0.0)
            for w in wins
            if (w.ticket_id, w.order_id) in self.seen
        ]
        return lags, len(missing)
