"""The reservation saga end to end over the real bus: tickets and orders in step."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import Platform, new_user, payments_settings
from tests.support import consumer_settled, eventually, stream_envelopes
from ticketing.common.events import Envelope, OrderCancelled, TicketRef
from ticketing.platform.stripe_sandbox import SandboxServer


@pytest.fixture
async def market(platform: Platform) -> Platform:
    await platform.start("tickets", "orders")
    return platform


async def sell(platform: Platform, seller: str, title: str = "Concert") -> dict[str, Any]:
    async with platform.client(seller) as c:
        response = await c.post("/api/tickets", json={"title": title, "price": 20})
    assert response.status_code == 201
    return dict(response.json())


async def buy(client: httpx.AsyncClient, ticket_id: str) -> httpx.Response:
    """Order a ticket, waiting for the orders replica to have heard of it."""

    async def attempt() -> httpx.Response | None:
        response = await client.post("/api/orders", json={"ticketId": ticket_id})
        return None if response.status_code == 404 else response

    response = await eventually(attempt)
    return response


async def ticket_matching(platform: Platform, ticket_id: str, **expected: Any) -> dict[str, Any]:
    async def probe() -> dict[str, Any]:
        async with platform.client() as c:
            shown = dict((await c.get(f"/api/tickets/{ticket_id}")).json())
        return shown if all(shown[k] == v for k, v in expected.items()) else {}

    return await eventually(probe)


async def test_order_reserves_cancel_releases_and_the_ticket_is_orderable_again(
    market: Platform,
) -> None:
    ticket = await sell(market, new_user())
    async with market.client(new_user()) as buyer:
        response = await buy(buyer, ticket["id"])
        assert response.status_code == 201
        first = response.json()
        reserved = await ticket_matching(market, ticket["id"], version=1)
        assert reserved["orderId"] == first["id"]
        async with market.client() as anonymous:
            assert (await anonymous.get("/api/tickets")).json() == []

        assert (await buyer.delete(f"/api/orders/{first['id']}")).status_code == 204
        released = await ticket_matching(market, ticket["id"], version=2)
        assert released["orderId"] is None

        # Once the replica has seen v1 and v2 too, the new order carries the current version.
        await eventually(lambda: _replica_at(market, ticket["id"], 2))
        response = await buyer.post("/api/orders", json={"ticketId": ticket["id"]})
    assert response.status_code == 201
    second = response.json()
    assert second["ticket"]["version"] == 2
    held = await ticket_matching(market, ticket["id"], version=3)
    assert held["orderId"] == second["id"]


async def test_an_edit_reaches_the_orders_replica(market: Platform) -> None:
    seller = new_user()
    ticket = await sell(market, seller)
    async with market.client(seller) as c:
        edited = await c.put(f"/api/tickets/{ticket['id']}", json={"title": "Moved", "price": 30})
        assert edited.status_code == 200
    await eventually(lambda: _replica_at(market, ticket["id"], 1))
    async with market.client(new_user()) as buyer:
        response = await buyer.post("/api/orders", json={"ticketId": ticket["id"]})
    assert response.status_code == 201
    placed = response.json()
    assert placed["ticket"] == {"id": ticket["id"], "title": "Moved", "price": 30, "version": 1}


async def _replica_at(platform: Platform, ticket_id: str, version: int) -> bool:
    from ticketing.orders.models import TicketReplica

    async with platform.runtime("orders").db.transaction() as session:
        found = await session.get(TicketReplica, ticket_id)
    return found is not None and found.version == version


async def test_an_order_committed_before_a_crash_is_published_once_after_restart(
    market: Platform,
) -> None:
    ticket = await sell(market, new_user())
    await eventually(lambda: _replica_at(market, ticket["id"], 0))
    # The relay dies: the order commits, but nothing publishes it.
    await market.runtime("orders").relay.stop()
    async with market.client(new_user()) as buyer:
        response = await buyer.post("/api/orders", json={"ticketId": ticket["id"]})
    assert response.status_code == 201
    placed = response.json()
    bus = market.runtime("orders").bus
    assert await stream_envelopes(bus, "order:created") == []
    # The process goes down and comes back: a new orders service on the same database.
    await market.stop("orders")
    await market.start("orders")
    bus = market.runtime("orders").bus
    published = await eventually(lambda: stream_envelopes(bus, "order:created"))
    assert [e.data["id"] for e in published] == [placed["id"]]
    reserved = await ticket_matching(market, ticket["id"], version=1)
    assert reserved["orderId"] == placed["id"]
    await eventually(lambda: consumer_settled(bus, "tickets"))
    assert len(await stream_envelopes(bus, "order:created")) == 1


async def test_a_late_cancel_of_an_old_order_does_not_free_the_new_holders_ticket(
    market: Platform,
) -> None:
    ticket = await sell(market, new_user())
    async with market.client(new_user()) as first, market.client(new_user()) as second:
        old = (await buy(first, ticket["id"])).json()
        await ticket_matching(market, ticket["id"], version=1)
        assert (await first.delete(f"/api/orders/{old['id']}")).status_code == 204
        await ticket_matching(market, ticket["id"], version=2)
        await eventually(lambda: _replica_at(market, ticket["id"], 2))
        new = (await second.post("/api/orders", json={"ticketId": ticket["id"]})).json()
        await ticket_matching(market, ticket["id"], version=3, orderId=new["id"])
    # A copy of the old cancellation arrives late (a new event id, as a redelivery from
    # another publisher would have).
    late = OrderCancelled(id=old["id"], version=1, ticket=TicketRef(id=ticket["id"]))
    runtime = market.runtime("orders")
    await runtime.publisher.publish(Envelope.wrap(late))
    await eventually(lambda: consumer_settled(runtime.bus, "tickets"))
    still = await ticket_matching(market, ticket["id"], version=3)
    assert still["orderId"] == new["id"]


async def test_an_expired_hold_is_superseded_and_the_ticket_follows(platform: Platform) -> None:
    await platform.start("tickets")
    await platform.start("orders", order_ttl_seconds=0)
    ticket = await sell(platform, new_user())
    async with platform.client(new_user()) as late, platform.client(new_user()) as next_buyer:
        stale = (await buy(late, ticket["id"])).json()
        await ticket_matching(platform, ticket["id"], version=1, orderId=stale["id"])
        fresh = await next_buyer.post("/api/orders", json={"ticketId": ticket["id"]})
        assert fresh.status_code == 201
    # The tickets service releases the stale hold (v2) and reserves for the new order (v3).
    held = await ticket_matching(platform, ticket["id"], version=3)
    assert held["orderId"] == fresh.json()["id"]


async def test_an_order_placed_on_a_price_just_changed_is_cancelled_not_sold_at_the_old_one(
    platform: Platform,
) -> None:
    """The seller changes the price while the old one is still in the orders replica, and a
    buyer orders at the old one: the tickets service holds the ticket at the new price. Neither
    side is held to a price it did not agree to: the order is cancelled, the ticket back on sale
    at the seller's price."""
    await platform.start("tickets", "orders")
    seller = new_user()
    ticket = await sell(platform, seller)
    await eventually(lambda: _replica_at(platform, ticket["id"], 0))
    # The orders service stops handling events: the edit stays on its way to the replica.
    await platform.stop("orders")
    await platform.start("orders", run_listeners=False)
    async with platform.client(seller) as c:
        edited = await c.put(f"/api/tickets/{ticket['id']}", json={"title": "Gig", "price": 70})
        assert edited.status_code == 200
    async with platform.client(new_user()) as buyer:
        placed = (await buyer.post("/api/orders", json={"ticketId": ticket["id"]})).json()
        assert (placed["status"], placed["ticket"]["price"]) == ("created", 20)
        await ticket_matching(platform, ticket["id"], version=2, orderId=placed["id"], price=70)
        # Events are handled again: the edit, then the hold at the new price.
        await platform.stop("orders")
        await platform.start("orders")
        await eventually(lambda: _status_is(buyer, placed["id"], "cancelled"))
    await ticket_matching(platform, ticket["id"], version=3, orderId=None, price=70)
    async with platform.client(new_user()) as next_buyer:
        again = await next_buyer.post("/api/orders", json={"ticketId": ticket["id"]})
    assert again.status_code == 201
    assert again.json()["ticket"]["price"] == 70


async def test_an_order_held_at_the_price_it_was_placed_at_stays(market: Platform) -> None:
    """The same check leaves every ordinary hold alone."""
    seller = new_user()
    ticket = await sell(market, seller)
    async with market.client(new_user()) as buyer:
        placed = (await buy(buyer, ticket["id"])).json()
        await ticket_matching(market, ticket["id"], version=1, orderId=placed["id"])
        await eventually(lambda: _replica_at(market, ticket["id"], 1))
        await eventually(lambda: consumer_settled(market.runtime("orders").bus, "orders"))
        shown = (await buyer.get(f"/api/orders/{placed['id']}")).json()
    assert shown["status"] == "created"


async def test_an_order_paid_before_its_hold_at_a_new_price_is_cancelled_and_refunded(
    platform: Platform, sandbox: SandboxServer
) -> None:
    """As above, but the buyer pays the moment the 201 arrives, and the payment reaches the
    orders service before the hold does (the seller's edit and the hold are published by
    different processes). The order is completed only once its hold is seen at its price:
    here it is cancelled instead, and the charge refunded."""
    await platform.start("tickets", "orders")
    await platform.start("payments", **payments_settings(sandbox))
    seller = new_user()
    ticket = await sell(platform, seller)
    await eventually(lambda: _replica_at(platform, ticket["id"], 0))
    # Neither the reservation nor the orders service's listener runs for now.
    for name in ("tickets", "orders"):
        await platform.stop(name)
        await platform.start(name, run_listeners=False)
    async with platform.client(seller) as c:
        edited = await c.put(f"/api/tickets/{ticket['id']}", json={"title": "Gig", "price": 70})
        assert edited.status_code == 200
    async with platform.client(new_user()) as buyer:
        placed = (await buyer.post("/api/orders", json={"ticketId": ticket["id"]})).json()

        async def paid() -> httpx.Response | None:
            answer = await buyer.post(
                "/api/payments", json={"orderId": placed["id"], "token": "tok_visa"}
            )
            return answer if answer.status_code != 404 else None  # the replica's moment

        assert (await eventually(paid)).status_code == 201
        # The reservation runs (the hold at 70 is now behind the payment), then the orders
        # service's listener.
        await platform.stop("tickets")
        await platform.start("tickets")
        await ticket_matching(platform, ticket["id"], version=2, orderId=placed["id"], price=70)
        await platform.stop("orders")
        await platform.start("orders")
        await eventually(lambda: _status_is(buyer, placed["id"], "cancelled"))
    await ticket_matching(platform, ticket["id"], version=3, orderId=None, price=70)
    await eventually(lambda: _refunded(sandbox))


async def _status_is(client: httpx.AsyncClient, order_id: str, status: str) -> bool:
    return bool((await client.get(f"/api/orders/{order_id}")).json()["status"] == status)


def _refunded(sandbox: SandboxServer) -> bool:
    [charge] = sandbox.app.state.sandbox.charges
    return bool(charge["refunded"])


async def test_an_order_paid_before_its_hold_completes_when_the_hold_comes(
    platform: Platform, sandbox: SandboxServer
) -> None:
    """The payment is noted, not retried until it gives up: the hold completes the order."""
    await platform.start("orders")
    await platform.start("payments", **payments_settings(sandbox))
    await platform.start("tickets", run_listeners=False)  # no reservation for now
    ticket = await sell(platform, new_user())
    await eventually(lambda: _replica_at(platform, ticket["id"], 0))
    async with platform.client(new_user()) as buyer:
        placed = (await buyer.post("/api/orders", json={"ticketId": ticket["id"]})).json()

        async def paid() -> httpx.Response | None:
            answer = await buyer.post(
                "/api/payments", json={"orderId": placed["id"], "token": "tok_visa"}
            )
            return answer if answer.status_code != 404 else None

        assert (await eventually(paid)).status_code == 201
        await eventually(lambda: consumer_settled(platform.runtime("orders").bus, "orders"))
        assert await _status_is(buyer, placed["id"], "created")  # paid, the hold not seen yet
        await platform.stop("tickets")
        await platform.start("tickets")
        await eventually(lambda: _status_is(buyer, placed["id"], "complete"))
    sold = await ticket_matching(platform, ticket["id"], orderId=placed["id"], version=2)
    assert sold["price"] == 20
    assert not _refunded(sandbox)
