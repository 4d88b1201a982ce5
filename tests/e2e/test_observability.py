"""Correlation ids travel from an HTTP request through the events into listeners' logs."""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from typing import Any

import pytest

from tests.conftest import Platform, new_user
from tests.support import eventually
from ticketing.common.db import utcnow
from ticketing.common.ids import new_id
from ticketing.common.logs import CorrelationFilter
from ticketing.common.outbox import OutboxEvent


@pytest.fixture
def listener_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.handler.addFilter(CorrelationFilter())
    caplog.set_level(logging.INFO, logger="ticketing.common.messaging")
    return caplog


async def handled(caplog: pytest.LogCaptureFixture, service: str, event_type: str) -> list[Any]:
    """The log records of `service` handling `event_type`."""
    return [
        r for r in caplog.records if r.getMessage().startswith(f"{service} handled {event_type}")
    ]


async def test_a_requests_correlation_id_reaches_the_listeners_it_caused(
    platform: Platform, listener_logs: pytest.LogCaptureFixture
) -> None:
    await platform.start("tickets", "orders")
    async with platform.client(new_user()) as seller:
        response = await seller.post(
            "/api/tickets",
            json={"title": "Traced", "price": 10},
            headers={"X-Correlation-ID": "req-sell-1"},
        )
    assert response.headers["X-Correlation-ID"] == "req-sell-1"
    ticket_id = response.json()["id"]
    [record] = await eventually(lambda: handled(listener_logs, "orders", "ticket:created"))
    assert record.correlation_id == "req-sell-1"

    async def ordered() -> dict[str, Any] | None:
        async with platform.client(new_user()) as buyer:
            placed = await buyer.post(
                "/api/orders",
                json={"ticketId": ticket_id},
                headers={"X-Correlation-ID": "req-buy-2"},
            )
        return placed.json() if placed.status_code == 201 else None

    await eventually(ordered)
    # order:created (from the request) reserves the ticket in tickets, whose ticket:updated
    # then reaches orders: the id follows the whole chain.
    [reserved] = await eventually(lambda: handled(listener_logs, "tickets", "order:created"))
    [updated] = await eventually(lambda: handled(listener_logs, "orders", "ticket:updated"))
    assert reserved.correlation_id == "req-buy-2"
    assert updated.correlation_id == "req-buy-2"


async def test_a_request_without_one_gets_one(platform: Platform) -> None:
    await platform.start("tickets")
    async with platform.client() as c:
        response = await c.get("/api/tickets")
    assert len(response.headers["X-Correlation-ID"]) == 32


async def test_outbox_and_listener_metrics_are_exposed(platform: Platform) -> None:
    await platform.start("tickets", "orders")
    async with platform.client(new_user()) as seller:
        await seller.post("/api/tickets", json={"title": "Metric", "price": 10})

    runtime = platform.runtime("orders")

    async def lag_seen() -> bool:
        text = runtime.metrics.render().body.decode()
        return 'ticketing_listener_lag_seconds{type="ticket:created"}' in text

    await eventually(lag_seen)


async def test_the_outbox_backlog_metrics_measure_what_is_left_unpublished(
    platform: Platform,
) -> None:
    await platform.start("tickets")
    runtime = platform.runtime("tickets")
    # A row no publish takes (its type makes no valid NATS subject), as one whose publishes
    # keep failing: pending for the last half minute.
    stuck = OutboxEvent(
        event_id=new_id(),
        type="stuck event",
        body="{}",
        created_at=utcnow() - timedelta(seconds=30),
    )
    async with runtime.db.transaction() as session:
        session.add(stuck)

    async def measured() -> str | None:
        text = runtime.metrics.render().body.decode()
        return text if "\nticketing_outbox_backlog 1.0\n" in text else None

    text = await eventually(measured)
    oldest = re.search(r"^ticketing_outbox_oldest_age_seconds (\S+)$", text, re.MULTILINE)
    assert oldest is not None
    assert float(oldest.group(1)) >= 30
