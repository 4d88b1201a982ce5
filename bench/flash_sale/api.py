"""The public API as buyers and sellers use it: keep-alive connections, one cookie per person."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import aiohttp

T = TypeVar("T")
JSON_HEADERS = {"Content-Type": "application/json"}


def client(concurrency: int) -> aiohttp.ClientSession:
    """One pool of keep-alive connections, enough for every concurrent buyer."""
    connector = aiohttp.TCPConnector(
        limit=concurrency * 2, keepalive_timeout=60, ttl_dns_cache=None
    )
    timeout = aiohttp.ClientTimeout(total=60)
    # Cookies are sent by hand: each request speaks for its own person.
    return aiohttp.ClientSession(
        connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar()
    )


class ApiError(RuntimeError):
    pass


class Api:
    def __init__(self, http: aiohttp.ClientSession, base_url: str) -> None:
        self.http = http
        self.base = base_url.rstrip("/")

    @staticmethod
    def headers(token: str) -> dict[str, str]:
        return {**JSON_HEADERS, "Cookie": f"session={token}"}

    async def call(
        self, method: str, path: str, token: str | None = None, body: Any = None
    ) -> tuple[int, Any]:
        headers = self.headers(token) if token else JSON_HEADERS
        data = None if body is None else json.dumps(body)
        async with self.http.request(method, self.base + path, data=data, headers=headers) as r:
            raw = await r.read()
            return r.status, json.loads(raw) if raw else None

    async def signup(self, email: str, password: str) -> str:
        body = json.dumps({"email": email, "password": password})
        async with self.http.post(
            f"{self.base}/api/users/signup", data=body, headers=JSON_HEADERS
        ) as r:
            if r.status != 201:
                raise ApiError(f"signup of {email}: {r.status} {await r.text()}")
            return r.cookies["session"].value

    async def create_ticket(self, token: str, title: str, price: float) -> str:
        status, body = await self.call(
            "POST", "/api/tickets", token, {"title": title, "price": price}
        )
        if status != 201:
            raise ApiError(f"listing a ticket: {status} {body}")
        ticket_id: str = body["id"]
        return ticket_id

    async def my_orders(self, token: str) -> list[dict[str, Any]]:
        status, body = await self.call("GET", "/api/orders", token)
        if status != 200:
            raise ApiError(f"listing orders: {status} {body}")
        orders: list[dict[str, Any]] = body
        return orders

    async def listing(self) -> list[dict[str, Any]]:
        status, body = await self.call("GET", "/api/tickets")
        if status != 200:
            raise ApiError(f"the listing: {status} {body}")
        tickets: list[dict[str, Any]] = body
        return tickets


async def bounded(limit: int, work: Iterable[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run the calls with at most `limit` in flight; results in order."""
    gate = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await call()

    return list(await asyncio.gather(*(one(call) for call in work)))
