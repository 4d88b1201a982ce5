"""A body over the cap is refused with a 413 in the contract's shape, however it is sent."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.conftest import Platform, new_user
from ticketing.common.body_limit import MAX_BODY_BYTES, TOO_LARGE


@pytest.fixture
async def shop(platform: Platform) -> Platform:
    await platform.start("tickets", "orders")
    return platform


JSON = {"content-type": "application/json"}


async def _streamed(size: int) -> AsyncIterator[bytes]:
    """A body sent in chunks without a Content-Length."""
    chunk = b" " * 65536
    for _ in range(size // len(chunk)):
        yield chunk


@pytest.mark.parametrize("path", ["/api/tickets", "/api/orders"])
async def test_a_body_over_the_cap_is_413_whether_declared_or_streamed(
    shop: Platform, path: str
) -> None:
    big = b'{"title": "x", "price": 10, "pad": "' + b"x" * MAX_BODY_BYTES + b'"}'
    async with shop.client(new_user()) as client:
        declared = await client.post(path, content=big, headers=JSON)
        streamed = await client.post(path, content=_streamed(2 * MAX_BODY_BYTES), headers=JSON)
        # A body within the cap goes on to the route as before.
        fine = await client.post(path, json={"title": "Show", "price": 10, "ticketId": "x"})
    for answer in (declared, streamed):
        assert (answer.status_code, answer.json()) == (413, TOO_LARGE)
    if path == "/api/tickets":
        assert fine.status_code == 201
    else:  # the route read the body: it says what is wrong with the id in it
        problem = {"message": "TicketId must be a valid id", "field": "ticketId"}
        assert (fine.status_code, fine.json()) == (400, {"errors": [problem]})


async def test_a_refused_body_is_counted_as_a_413(shop: Platform) -> None:
    big = b"x" * (MAX_BODY_BYTES + 1)
    async with shop.client(new_user()) as client:
        assert (await client.post("/api/tickets", content=big, headers=JSON)).status_code == 413
    counted = shop.runtime("tickets").metrics.requests
    samples = [s for metric in counted.collect() for s in metric.samples]
    assert any(s.labels.get("status") == "413" and s.value >= 1 for s in samples)
