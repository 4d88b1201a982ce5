"""The whole order lifecycle over the real bus: every back-end service, a reservation of
seconds."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import Platform, new_user, payments_settings
from tests.support import eventually
from ticketing.platform.stripe_sandbox import SandboxServer

TTL = 2
# For an order a test pays before it expires: the time to pay, even on a loaded machine.
TTL_TO_PAY = 6


@pytest.fixture(params=[TTL])
async def everything(
    platform: Platform, sandbox: SandboxServer, request: pytest.FixtureRequest
) -> Platform:
    ttl: int = request.param
    await platform.start("tickets", "expiration", order_ttl_seconds=ttl)
    await platform.start("orders", order_ttl_seconds=ttl)
    await platform.start("payments", **payments_settings(sandbox))
    return platform


async def sell_and_order(platform: Platform, buyer: httpx.AsyncClient) -> tuple[str, str]:
    async with platform.client(new_user()) as seller:
        ticket = (await seller.post("/api/tickets", json={"title": "Gig", "price": 25})).json()

    async def ordered() -> dict[str, Any] | None:
        response = await buyer.post("/api/orders", json={"ticketId": ticket["id"]})
        return dict(response.json()) if response.status_code == 201 else None

    order = await eventually(ordered)
    return ticket["id"], order["id"]


async def order_status(client: httpx.AsyncClient, order_id: str, status: str) -> bool:
    return bool((await client.get(f"/api/orders/{order_id}")).json()["status"] == status)


async def ticket_state(platform: Platform, ticket_id: str) -> dict[str, Any]:
    async with platform.client() as c:
        return dict((await c.get(f"/api/tickets/{ticket_id}")).json())


async def test_an_unpaid_order_expires_and_its_ticket_is_on_sale_again(
    everything: Platform,
) -> None:
    async with everything.client(new_user()) as buyer:
        ticket_id, order_id = await sell_and_order(everything, buyer)
        await eventually(lambda: order_status(buyer, order_id, "cancelled"), within=15)

    async def listed() -> bool:
        async with everything.client() as c:
            return ticket_id in [t["id"] for t in (await c.get("/api/tickets")).json()]

    await eventually(listed)
    state = await ticket_state(everything, ticket_id)
    assert state["orderId"] is None
    assert state["version"] == 2


@pytest.mark.parametrize("everything", [TTL_TO_PAY], indirect=True)
async def test_a_paid_order_completes_and_stays_complete_after_its_ttl(
    everything: Platform, sandbox: SandboxServer
) -> None:
    async with everything.client(new_user()) as buyer:
        ticket_id, order_id = await sell_and_order(everything, buyer)

        async def paid() -> httpx.Response | None:
            response = await buyer.post(
                "/api/payments", json={"orderId": order_id, "token": "tok_visa"}
            )
            return None if response.status_code == 404 else response  # replica not there yet

        response = await eventually(paid)
        assert response.status_code == 201
        await eventually(lambda: order_status(buyer, order_id, "complete"))
        # The expiration job fires after the TTL and must change nothing.
        await eventually(lambda: _expiry_handled(everything))
        assert await order_status(buyer, order_id, "complete")
        cancel = await buyer.delete(f"/api/orders/{order_id}")
        assert cancel.status_code == 400
    sold = await ticket_state(everything, ticket_id)
    assert sold["orderId"] == order_id
    assert sold["version"] == 2  # reserved, then sold
    async with everything.client(new_user()) as other:
        again = await other.post("/api/orders", json={"ticketId": ticket_id})
        assert again.status_code == 400
    assert len(sandbox.app.state.sandbox.charges) == 1


async def test_paying_the_moment_an_order_is_cancelled_is_refused_and_charges_nothing(
    everything: Platform, sandbox: SandboxServer
) -> None:
    """Straight after the DELETE's 204, while the payments replica may not even have the order
    yet: the contract's 400, and no card charged (and then refunded) on the way."""
    async with everything.client(new_user()) as buyer:
        _ticket_id, order_id = await sell_and_order(everything, buyer)
        assert (await buyer.delete(f"/api/orders/{order_id}")).status_code == 204
        paid = await buyer.post("/api/payments", json={"orderId": order_id, "token": "tok_visa"})
    assert paid.status_code == 400
    assert paid.json()["errors"][0]["message"] == "Cannot pay for a cancelled order"
    assert len(sandbox.app.state.sandbox.charges) == 0


async def _expiry_handled(platform: Platform) -> bool:
    """True once the orders service has handled an expiration:complete event."""
    metrics = platform.runtime("orders").metrics.events_handled
    handled = metrics.labels(type="expiration:complete", outcome="handled")._value.get()
    return bool(handled >= 1)
