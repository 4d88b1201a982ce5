"""The orders contract, route by route, with the ticket replica seeded as its events would."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from tests.conftest import Platform, new_user
from tests.support import eventually, stream_envelopes
from ticketing.common import messaging
from ticketing.common.events import Envelope, TicketCreated
from ticketing.common.outbox import OutboxEvent
from ticketing.orders import service
from ticketing.orders.models import Order, OrderStatus


@pytest.fixture
async def orders(platform: Platform) -> Platform:
    await platform.start("orders")
    return platform


async def seed_ticket(platform: Platform, *, seller: str | None = None, price: str = "20") -> str:
    """A ticket in the orders replica, as ticket:created leaves it."""
    ticket_id = str(uuid.uuid4())
    event = TicketCreated(
        id=ticket_id, version=0, title="Concert", price=Decimal(price), user_id=seller or new_user()
    )
    async with platform.runtime("orders").db.transaction() as session:
        await service.ticket_created(session, event)
    return ticket_id


async def order(client: httpx.AsyncClient, ticket_id: str) -> httpx.Response:
    return await client.post("/api/orders", json={"ticketId": ticket_id})


@pytest.mark.parametrize("spelling", [str.upper, lambda i: i.replace("-", ""), "{{{}}}".format])
async def test_another_spelling_of_a_ticket_id_names_the_same_ticket(
    orders: Platform, spelling: Any
) -> None:
    """As in a path, where /api/tickets/<id without hyphens> is the same ticket."""
    ticket_id = await seed_ticket(orders)
    async with orders.client(new_user()) as c:
        response = await order(c, spelling(ticket_id))
    assert response.status_code == 201
    assert response.json()["ticket"]["id"] == ticket_id


async def test_create_returns_the_order(orders: Platform) -> None:
    ticket_id = await seed_ticket(orders, price="20.5")
    buyer = new_user()
    before = datetime.now(UTC)
    async with orders.client(buyer) as c:
        response = await order(c, ticket_id)
    assert response.status_code == 201
    body = response.json()
    assert body == {
        "id": body["id"],
        "userId": buyer,
        "status": "created",
        "expiresAt": body["expiresAt"],
        "version": 0,
        "ticket": {"id": ticket_id, "title": "Concert", "price": 20.5, "version": 0},
    }
    assert body["expiresAt"].endswith("Z")
    expires = datetime.fromisoformat(body["expiresAt"])
    ttl = timedelta(seconds=orders.settings.order_ttl_seconds)
    assert before + ttl <= expires <= datetime.now(UTC) + ttl


async def test_create_publishes_order_created(orders: Platform) -> None:
    ticket_id = await seed_ticket(orders)
    async with orders.client(new_user()) as c:
        body = (await order(c, ticket_id)).json()
    bus = orders.runtime("orders").bus
    published = await eventually(lambda: stream_envelopes(bus, "order:created"))
    assert published[0].data == {
        "id": body["id"],
        "version": 0,
        "status": "created",
        "userId": body["userId"],
        "expiresAt": body["expiresAt"],
        "ticket": {"id": ticket_id, "price": 20},
    }


async def test_the_201_comes_once_order_created_is_sent_not_once_it_is_acked(
    orders: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 201's request hands order:created to NATS itself; JetStream's ack is the relay's
    business: with every ack held back, the 201 still comes, the event is stored, and its row
    waits, unmarked, for the relay to hear of the ack."""
    runtime = orders.runtime("orders")
    release = asyncio.Event()

    async def held_back(sends: Any) -> None:
        await release.wait()

    monkeypatch.setattr(runtime.relay.publisher, "acked", held_back)
    ticket_id = await seed_ticket(orders)
    try:
        async with orders.client(new_user()) as c:
            body = (await order(c, ticket_id)).json()
        published = await eventually(lambda: stream_envelopes(runtime.bus, "order:created"))
        assert [e.data["id"] for e in published] == [body["id"]]
        async with runtime.db.transaction() as session:
            unmarked = await session.scalars(
                select(OutboxEvent.type).where(OutboxEvent.published_at.is_(None))
            )
            assert "order:created" in set(unmarked)
    finally:
        release.set()  # acked now: the relay marks it
    await eventually(lambda: _all_marked(runtime.db))


async def _all_marked(db: Any) -> bool:
    async with db.transaction() as session:
        pending = await session.scalars(
            select(OutboxEvent.seq).where(OutboxEvent.published_at.is_(None))
        )
        return not list(pending)


async def test_create_requires_a_session(orders: Platform) -> None:
    ticket_id = await seed_ticket(orders)
    async with orders.client() as c:
        assert (await order(c, ticket_id)).status_code == 401
        # Whatever the body: one that does not parse is not a reason to answer 400 first.
        for body in (b"{oops", b'{"ticketId": 5}', b"[]"):
            headers = {"content-type": "application/json"}
            response = await c.post("/api/orders", content=body, headers=headers)
            assert response.status_code == 401, (body, response.text)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "TicketId must be provided"),
        ({"ticketId": ""}, "TicketId must be provided"),
        ({"ticketId": 12}, "TicketId must be provided"),
        ({"ticketId": "not-an-id"}, "TicketId must be a valid id"),
    ],
)
async def test_create_validation(orders: Platform, body: dict[str, Any], message: str) -> None:
    async with orders.client(new_user()) as c:
        response = await c.post("/api/orders", json=body)
    assert response.status_code == 400
    assert response.json() == {"errors": [{"message": message, "field": "ticketId"}]}


async def test_an_unknown_ticket_is_404(orders: Platform) -> None:
    async with orders.client(new_user()) as c:
        response = await order(c, str(uuid.uuid4()))
    assert response.status_code == 404
    assert response.json() == {"errors": [{"message": "Ticket not found", "field": None}]}


async def test_a_ticket_not_replicated_yet_is_a_503_while_orders_is_behind(
    orders: Platform,
) -> None:
    """Its ticket:created on the stream but not handled here (the events worker restarting):
    come back in a moment, not 'Ticket not found'; once handled, the order goes through."""
    runtime = orders.runtime("orders")
    await runtime.listener.stop()
    ticket = TicketCreated(
        id=str(uuid.uuid4()), version=0, title="Gig", price=Decimal(20), user_id=new_user()
    )
    await runtime.publisher.publish(Envelope.wrap(ticket))
    async with orders.client(new_user()) as c:
        behind = await order(c, ticket.id)
        await runtime.listener.start()
        caught_up = await order(c, ticket.id)
    assert behind.status_code == 503
    assert behind.json()["errors"][0]["message"] == (
        "Orders are catching up; please try again in a moment"
    )
    assert caught_up.status_code == 201


async def test_an_unknown_ticket_is_404_while_another_event_waits_for_a_retry(
    orders: Platform,
) -> None:
    """An early ticket:updated (its predecessor not here) waits to be retried: the service
    is not behind on the tickets it was told of, and an unknown ticket is still a 404."""
    from ticketing.common.events import TicketUpdated

    runtime = orders.runtime("orders")
    early = TicketUpdated(
        id=str(uuid.uuid4()), version=3, title="Gig", price=Decimal(20), user_id=new_user()
    )
    await runtime.publisher.publish(Envelope.wrap(early))
    listed = await seed_published_ticket(orders)
    async with orders.client(new_user()) as c:
        unknown = await order(c, str(uuid.uuid4()))
        known = await order(c, listed)
    assert (unknown.status_code, known.status_code) == (404, 201)


async def seed_published_ticket(platform: Platform) -> str:
    """A ticket:created on the stream, for the orders service to take from there."""
    ticket = TicketCreated(
        id=str(uuid.uuid4()), version=0, title="Gig", price=Decimal(20), user_id=new_user()
    )
    await platform.runtime("orders").publisher.publish(Envelope.wrap(ticket))
    return ticket.id


async def test_a_ticket_ordered_before_it_reached_the_replica_is_waited_for(
    orders: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A buyer may order a ticket the moment it is listed, before ticket:created is here."""
    # Long enough for the ticket to arrive however slow the machine: the wait ends when it does.
    monkeypatch.setattr(messaging, "REPLICA_WAIT_SECONDS", 30.0)
    waiting = asyncio.Event()
    replicated = service.replicated

    async def noting_the_wait(read: Any) -> Any:
        waiting.set()
        return await replicated(read)

    monkeypatch.setattr(service, "replicated", noting_the_wait)
    ticket_id = str(uuid.uuid4())
    async with orders.client(new_user()) as c:
        ordering = asyncio.create_task(order(c, ticket_id))
        await asyncio.wait_for(waiting.wait(), timeout=10)
        listed = TicketCreated(
            id=ticket_id, version=0, title="Gig", price=Decimal("12"), user_id=new_user()
        )
        async with orders.runtime("orders").db.transaction() as session:
            await service.ticket_created(session, listed)
        response = await ordering
    assert response.status_code == 201
    assert response.json()["ticket"] == {"id": ticket_id, "title": "Gig", "price": 12, "version": 0}


async def test_a_reserved_ticket_cannot_be_ordered_again(orders: Platform) -> None:
    ticket_id = await seed_ticket(orders)
    async with orders.client(new_user()) as first, orders.client(new_user()) as second:
        assert (await order(first, ticket_id)).status_code == 201
        response = await order(second, ticket_id)
    assert response.status_code == 400
    assert response.json() == {"errors": [{"message": "Ticket is already reserved", "field": None}]}


async def test_buying_your_own_ticket_is_refused(orders: Platform) -> None:
    seller = new_user()
    ticket_id = await seed_ticket(orders, seller=seller)
    async with orders.client(seller) as c:
        response = await order(c, ticket_id)
    assert response.status_code == 400
    assert response.json()["errors"][0]["message"] == "You cannot buy your own ticket"


async def test_the_seller_hears_it_is_their_own_ticket_even_when_it_is_held(
    orders: Platform,
) -> None:
    seller = new_user()
    ticket_id = await seed_ticket(orders, seller=seller)
    async with orders.client(new_user()) as buyer, orders.client(seller) as c:
        assert (await order(buyer, ticket_id)).status_code == 201
        response = await order(c, ticket_id)
    assert response.status_code == 400
    assert response.json()["errors"][0]["message"] == "You cannot buy your own ticket"


async def test_an_expired_order_no_longer_blocks_a_new_buyer(platform: Platform) -> None:
    await platform.start("orders", order_ttl_seconds=0)
    ticket_id = await seed_ticket(platform)
    async with platform.client(new_user()) as late, platform.client(new_user()) as next_buyer:
        stale = (await order(late, ticket_id)).json()
        response = await order(next_buyer, ticket_id)
        assert response.status_code == 201
        fresh = response.json()
        assert (await late.get(f"/api/orders/{stale['id']}")).json()["status"] == "cancelled"
    bus = platform.runtime("orders").bus
    published = await eventually(lambda: _types(bus, 3))
    # The stale order's cancellation goes out before the new order, from the same commit.
    assert [(e.type, e.data["id"]) for e in published] == [
        ("order:created", stale["id"]),
        ("order:cancelled", stale["id"]),
        ("order:created", fresh["id"]),
    ]


async def test_buyers_racing_for_an_expired_hold_cancel_it_once_and_one_wins(
    platform: Platform,
) -> None:
    await platform.start("orders", order_ttl_seconds=0)
    ticket_id = await seed_ticket(platform)
    async with platform.client(new_user()) as late:
        stale = (await order(late, ticket_id)).json()
    platform.runtime("orders").settings.order_ttl_seconds = 900  # the winner's order holds
    responses = await _buyers_at_once(platform, ticket_id, 10)
    assert sorted(r.status_code for r in responses) == [201] + [400] * 9
    bus = platform.runtime("orders").bus
    published = await eventually(lambda: _types(bus, 3))
    cancellations = [e for e in published if e.type == "order:cancelled"]
    assert [(e.data["id"], e.data["version"]) for e in cancellations] == [(stale["id"], 1)]


async def _types(bus: Any, n: int) -> list[Any]:
    found = await stream_envelopes(bus)
    return found if len(found) >= n else []


async def _buyers_at_once(platform: Platform, ticket_id: str, n: int) -> list[httpx.Response]:
    clients = [platform.client(new_user()) for _ in range(n)]
    try:
        return list(await asyncio.gather(*(order(c, ticket_id) for c in clients)))
    finally:
        for c in clients:
            await c.aclose()


async def test_fifty_concurrent_buyers_one_winner(orders: Platform) -> None:
    ticket_id = await seed_ticket(orders)
    responses = await _buyers_at_once(orders, ticket_id, 50)
    codes = sorted(r.status_code for r in responses)
    assert codes.count(201) == 1
    assert codes.count(400) == 49
    losers = [r.json() for r in responses if r.status_code == 400]
    assert all(
        body == {"errors": [{"message": "Ticket is already reserved", "field": None}]}
        for body in losers
    )


async def test_list_shows_my_orders_oldest_first(orders: Platform) -> None:
    buyer = new_user()
    tickets = [await seed_ticket(orders) for _ in range(3)]
    async with orders.client(buyer) as mine, orders.client(new_user()) as other:
        ids = [(await order(mine, t)).json()["id"] for t in tickets[:2]]
        await order(other, tickets[2])
        response = await mine.get("/api/orders")
    assert response.status_code == 200
    assert [o["id"] for o in response.json()] == ids
    assert all(o["ticket"]["title"] == "Concert" for o in response.json())


async def test_list_and_show_require_a_session(orders: Platform) -> None:
    async with orders.client() as c:
        assert (await c.get("/api/orders")).status_code == 401
        assert (await c.get(f"/api/orders/{uuid.uuid4()}")).status_code == 401


async def test_show(orders: Platform) -> None:
    ticket_id = await seed_ticket(orders)
    async with orders.client(new_user()) as buyer, orders.client(new_user()) as stranger:
        created = (await order(buyer, ticket_id)).json()
        shown = await buyer.get(f"/api/orders/{created['id']}")
        assert shown.status_code == 200
        assert shown.json() == created
        assert (await stranger.get(f"/api/orders/{created['id']}")).status_code == 401
        for missing in (str(uuid.uuid4()), "nope"):
            response = await buyer.get(f"/api/orders/{missing}")
            assert response.status_code == 404
            assert response.json()["errors"][0]["message"] == "Order not found"


async def test_cancel(orders: Platform) -> None:
    ticket_id = await seed_ticket(orders)
    async with orders.client(new_user()) as buyer, orders.client(new_user()) as stranger:
        created = (await order(buyer, ticket_id)).json()
        url = f"/api/orders/{created['id']}"
        assert (await stranger.delete(url)).status_code == 401
        assert (await buyer.delete(f"/api/orders/{uuid.uuid4()}")).status_code == 404
        response = await buyer.delete(url)
        assert response.status_code == 204
        assert response.content == b""
        shown = (await buyer.get(url)).json()
        assert shown["status"] == "cancelled"
        assert shown["version"] == 1
        assert (await buyer.delete(url)).status_code == 204  # twice is harmless
        assert (await stranger.post("/api/orders", json={"ticketId": ticket_id})).status_code == 201
    bus = orders.runtime("orders").bus
    cancelled = await eventually(lambda: stream_envelopes(bus, "order:cancelled"))
    assert [e.data for e in cancelled] == [
        {"id": created["id"], "version": 1, "ticket": {"id": ticket_id}}
    ]


async def test_a_completed_order_cannot_be_cancelled(orders: Platform) -> None:
    ticket_id = await seed_ticket(orders)
    async with orders.client(new_user()) as buyer:
        created = (await order(buyer, ticket_id)).json()
        async with orders.runtime("orders").db.transaction() as session:
            await session.execute(
                update(Order)
                .where(Order.id == created["id"])
                .values(status=OrderStatus.COMPLETE, version=1)
            )
        response = await buyer.delete(f"/api/orders/{created['id']}")
    assert response.status_code == 400
    assert response.json()["errors"][0]["message"] == "Cannot cancel a completed order"


async def test_cancellations_at_the_same_moment_all_answer_204(orders: Platform) -> None:
    """Each one that loses the race on the order's version reads it again: never a 500."""
    buyer = new_user()
    for _ in range(5):
        ticket_id = await seed_ticket(orders)
        async with orders.client(buyer) as c:
            placed = (await order(c, ticket_id)).json()
            answers = await asyncio.gather(
                *(c.delete(f"/api/orders/{placed['id']}") for _ in range(4))
            )
            assert [a.status_code for a in answers] == [204] * 4
            shown = (await c.get(f"/api/orders/{placed['id']}")).json()
        assert (shown["status"], shown["version"]) == ("cancelled", 1)
