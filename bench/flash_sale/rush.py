"""The rush: N buyers order the best seats left until none is left; most attempts lose."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice

import aiohttp

from bench.flash_sale.api import Api

# Transport errors in a row (no answer at all) after which the target is down and the rush
# stops; a worker killed outright (--kill-every) cuts off only the attempts it had in hand.
TRANSPORT_ERRORS_IN_A_ROW = 50


@dataclass(frozen=True)
class Attempt:
    start: float  # seconds since the rush began
    latency: float  # seconds
    status: int  # 0 for a transport error
    ticket_id: str


@dataclass(frozen=True)
class Win:
    ticket_id: str
    order_id: str
    buyer: int
    at: float  # time.perf_counter() when the 201 arrived


@dataclass
class RushResult:
    attempts: list[Attempt] = field(default_factory=list)
    wins: list[Win] = field(default_factory=list)
    duration: float = 0.0
    transport_errors: int = 0

    def extend(self, later: RushResult) -> None:
        """Append a later round, its attempts' times after this one's."""
        offset = self.duration
        self.attempts += [
            Attempt(a.start + offset, a.latency, a.status, a.ticket_id) for a in later.attempts
        ]
        self.wins += later.wins
        self.duration += later.duration
        self.transport_errors += later.transport_errors

    @property
    def unexpected_statuses(self) -> dict[str, int]:
        """How many of each unexpected answer, by status (0: no answer)."""
        counts = Counter(str(a.status) for a in self.attempts if a.status not in (201, 400))
        return dict(sorted(counts.items()))


class Listing:
    """What the buyers see: the tickets still for sale, best seats first. An answer about a
    ticket (sold to me, or already reserved) takes it off, as a refreshed page would."""

    def __init__(self, ticket_ids: list[str], hot: int, seed: int) -> None:
        self._left = dict.fromkeys(ticket_ids)
        self._hot = hot
        self._random = random.Random(seed)

    def pick(self) -> str | None:
        front = list(islice(self._left, self._hot))
        return self._random.choice(front) if front else None

    def take(self, ticket_id: str) -> None:
        self._left.pop(ticket_id, None)


async def rush(
    api: Api,
    tokens: list[str],
    ticket_ids: list[str],
    *,
    hot: int,
    on_win: Callable[[Win], None] | None = None,
) -> RushResult:
    result = RushResult()
    listing = Listing(ticket_ids, hot, seed=len(ticket_ids))
    url = f"{api.base}/api/orders"
    began = time.perf_counter()
    failing = 0  # transport errors since the last answer

    async def buyer(index: int) -> None:
        nonlocal failing
        headers = api.headers(tokens[index])
        while (ticket_id := listing.pick()) is not None:
            if failing > TRANSPORT_ERRORS_IN_A_ROW:
                return
            body = json.dumps({"ticketId": ticket_id})
            start = time.perf_counter()
            try:
                async with api.http.post(url, data=body, headers=headers) as response:
                    status, raw = response.status, await response.read()
            except (aiohttp.ClientError, TimeoutError):
                status, raw = 0, b""
                result.transport_errors += 1
                failing += 1
            else:
                failing = 0
            end = time.perf_counter()
            result.attempts.append(Attempt(start - began, end - start, status, ticket_id))
            if status == 201:
                win = Win(ticket_id, json.loads(raw)["id"], index, end)
                result.wins.append(win)
                if on_win is not None:
                    on_win(win)
            if status and status < 500:
                listing.take(ticket_id)

    await asyncio.gather(*(buyer(i) for i in range(len(tokens))))
    result.duration = time.perf_counter() - began
    return result
