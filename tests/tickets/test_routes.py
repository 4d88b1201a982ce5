"""The tickets contract, route by route."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest

from tests.conftest import Platform, new_user
from tests.support import consumer_settled, eventually, stream_envelopes
from ticketing.common.events import OrderCancelled, OrderCompleted, OrderCreated
from ticketing.tickets import service

VALID = {"title": "Concert", "price": 20}


@pytest.fixture
async def tickets(platform: Platform) -> Platform:
    await platform.start("tickets")
    return platform


async def create(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await client.post("/api/tickets", json={**VALID, **body})
    assert response.status_code == 201, response.text
    return dict(response.json())


async def hold(platform: Platform, ticket_id: str, *, sold: bool = False) -> str:
    """Reserve (and optionally sell) a ticket the way the order events do."""
    order_id = str(uuid.uuid4())
    async with platform.runtime("tickets").db.transaction() as session:
        await service.reserve(session, ticket_id=ticket_id, order_id=order_id)
    if sold:
        async with platform.runtime("tickets").db.transaction() as session:
            await service.mark_sold(session, ticket_id=ticket_id, order_id=order_id)
    return order_id


async def test_create_returns_the_ticket(tickets: Platform) -> None:
    user = new_user()
    async with tickets.client(user) as c:
        response = await c.post("/api/tickets", json={"title": "Concert", "price": 20.5})
    assert response.status_code == 201
    body = response.json()
    assert body == {
        "id": body["id"],
        "title": "Concert",
        "price": 20.5,
        "userId": user,
        "version": 0,
        "orderId": None,
    }
    uuid.UUID(body["id"])


@pytest.mark.parametrize("price", ["0.01", "0.50", "999999.99"])
async def test_any_price_greater_than_0_up_to_what_a_card_can_pay_is_listed(
    tickets: Platform, price: str
) -> None:
    async with tickets.client(new_user()) as c:
        response = await c.post("/api/tickets", json={"title": "Show", "price": price})
    assert response.status_code == 201
    assert response.json()["price"] == float(price)


async def test_create_requires_a_session(tickets: Platform) -> None:
    async with tickets.client() as c:
        response = await c.post("/api/tickets", json=VALID)
    assert response.status_code == 401
    assert response.json() == {"errors": [{"message": "Not authorized", "field": None}]}


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"price": 10}, "title", "Title is required"),
        ({"title": "", "price": 10}, "title", "Title is required"),
        ({"title": "   ", "price": 10}, "title", "Title is required"),
        ({"title": 5, "price": 10}, "title", "Title is required"),
        ({"title": "x" * 201, "price": 10}, "title", "Title must be at most 200 characters"),
        ({"title": "Show"}, "price", "Price must be greater than 0"),
        ({"title": "Show", "price": 0}, "price", "Price must be greater than 0"),
        ({"title": "Show", "price": -10}, "price", "Price must be greater than 0"),
        ({"title": "Show", "price": "abc"}, "price", "Price must be greater than 0"),
        ({"title": "Show", "price": "1_000"}, "price", "Price must be greater than 0"),
        ({"title": "Show", "price": "Infinity"}, "price", "Price must be greater than 0"),
        ({"title": "Show", "price": True}, "price", "Price must be greater than 0"),
        ({"title": "Show", "price": None}, "price", "Price must be greater than 0"),
        ({"title": "Show", "price": 1.234}, "price", "Price must have at most 2 decimal places"),
        ({"title": "Show", "price": 1e12}, "price", "Price must be at most 999999.99"),
        ({"title": "Show", "price": "1000000"}, "price", "Price must be at most 999999.99"),
    ],
)
async def test_create_validation(
    tickets: Platform, body: dict[str, Any], field: str, message: str
) -> None:
    async with tickets.client(new_user()) as c:
        response = await c.post("/api/tickets", json=body)
    assert response.status_code == 400
    assert response.json() == {"errors": [{"message": message, "field": field}]}


async def test_a_price_written_as_a_plain_number_in_a_string_is_taken(tickets: Platform) -> None:
    """As a form sends it; what a string may hold is a decimal number and nothing else."""
    async with tickets.client(new_user()) as c:
        response = await c.post("/api/tickets", json={"title": "Show", "price": " 20.50 "})
    assert (response.status_code, response.json()["price"]) == (201, 20.5)


async def test_create_publishes_ticket_created(tickets: Platform) -> None:
    async with tickets.client(new_user()) as c:
        ticket = await create(c)
    bus = tickets.runtime("tickets").bus
    published = await eventually(lambda: stream_envelopes(bus, "ticket:created"))
    assert published[0].data == {
        "id": ticket["id"],
        "version": 0,
        "title": "Concert",
        "price": 20,
        "userId": ticket["userId"],
    }


async def test_list_shows_only_tickets_on_sale(tickets: Platform) -> None:
    async with tickets.client(new_user()) as c:
        free = await create(c, title="Free")
        reserved = await create(c, title="Reserved")
        sold = await create(c, title="Sold")
    await hold(tickets, reserved["id"])
    await hold(tickets, sold["id"], sold=True)
    async with tickets.client() as anonymous:
        response = await anonymous.get("/api/tickets")
    assert response.status_code == 200
    assert [t["id"] for t in response.json()] == [free["id"]]


async def test_show(tickets: Platform) -> None:
    async with tickets.client(new_user()) as c:
        ticket = await create(c)
    async with tickets.client() as anonymous:
        response = await anonymous.get(f"/api/tickets/{ticket['id']}")
        assert response.status_code == 200
        assert response.json() == ticket
        for missing in (str(uuid.uuid4()), "not-an-id"):
            response = await anonymous.get(f"/api/tickets/{missing}")
            assert response.status_code == 404
            assert response.json() == {"errors": [{"message": "Ticket not found", "field": None}]}


async def test_update_by_the_owner_bumps_the_version_and_publishes(tickets: Platform) -> None:
    async with tickets.client(new_user()) as c:
        ticket = await create(c)
        response = await c.put(f"/api/tickets/{ticket['id']}", json={"title": "New", "price": 35})
        again = await c.put(f"/api/tickets/{ticket['id']}", json={"title": "Newer", "price": 40})
    assert response.status_code == 200
    assert response.json() == {**ticket, "title": "New", "price": 35, "version": 1}
    assert again.json()["version"] == 2
    bus = tickets.runtime("tickets").bus
    updates = await eventually(lambda: _updates(bus, 2))
    assert [(u.data["version"], u.data["title"]) for u in updates] == [(1, "New"), (2, "Newer")]


async def test_an_update_that_changes_nothing_is_a_new_version_too(tickets: Platform) -> None:
    async with tickets.client(new_user()) as c:
        ticket = await create(c)
        same = {"title": ticket["title"], "price": ticket["price"]}
        response = await c.put(f"/api/tickets/{ticket['id']}", json=same)
    assert response.status_code == 200
    assert response.json() == {**ticket, "version": 1}
    bus = tickets.runtime("tickets").bus
    updates = await eventually(lambda: _updates(bus, 1))
    assert [u.data["version"] for u in updates] == [1]


async def test_edits_sent_at_once_each_land_or_are_told_to_try_again(tickets: Platform) -> None:
    """A seller's edits of one ticket at the same moment: each is a new version in turn, or a
    409 for one that lost every race; never a 500."""
    async with tickets.client(new_user()) as c:
        ticket = await create(c)
        url = f"/api/tickets/{ticket['id']}"
        edits = [c.put(url, json={"title": "Show", "price": 10 + n}) for n in range(20)]
        answers = await asyncio.gather(*edits)
        final = (await c.get(url)).json()
    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {200, 409}, [a.text for a in answers]
    assert 200 in statuses  # someone wins each race
    assert final["version"] == statuses.count(200)
    for lost in (a for a in answers if a.status_code == 409):
        assert lost.json()["errors"][0]["message"].endswith("please try again")


async def _updates(bus: Any, n: int) -> list[Any]:
    found = await stream_envelopes(bus, "ticket:updated")
    return found if len(found) >= n else []


async def test_update_errors(tickets: Platform) -> None:
    owner = new_user()
    async with tickets.client(owner) as c:
        ticket = await create(c)
        url = f"/api/tickets/{ticket['id']}"
        assert (await c.put(f"/api/tickets/{uuid.uuid4()}", json=VALID)).status_code == 404
        assert (await c.put("/api/tickets/nope", json=VALID)).status_code == 404
        invalid = await c.put(url, json={"title": "", "price": 10})
        assert invalid.status_code == 400
        assert invalid.json()["errors"] == [{"message": "Title is required", "field": "title"}]
        invalid = await c.put(url, json={"title": "Ok", "price": -1})
        assert invalid.json()["errors"] == [
            {"message": "Price must be greater than 0", "field": "price"}
        ]
    async with tickets.client() as anonymous:
        assert (await anonymous.put(url, json=VALID)).status_code == 401
    async with tickets.client(new_user()) as stranger:
        response = await stranger.put(url, json={"title": "Mine now", "price": 1})
        assert response.status_code == 401
    async with tickets.client(owner) as c:
        assert (await c.get(url)).json()["title"] == "Concert"


async def test_a_reserved_ticket_cannot_be_edited(tickets: Platform) -> None:
    owner = new_user()
    async with tickets.client(owner) as c:
        ticket = await create(c)
        await hold(tickets, ticket["id"])
        response = await c.put(f"/api/tickets/{ticket['id']}", json={"title": "X", "price": 1})
    assert response.status_code == 400
    assert response.json() == {
        "errors": [{"message": "Cannot edit a reserved ticket", "field": None}]
    }


async def test_a_sold_ticket_cannot_be_edited(tickets: Platform) -> None:
    owner = new_user()
    async with tickets.client(owner) as c:
        ticket = await create(c)
        await hold(tickets, ticket["id"], sold=True)
        response = await c.put(f"/api/tickets/{ticket['id']}", json={"title": "X", "price": 1})
        shown = (await c.get(f"/api/tickets/{ticket['id']}")).json()
    assert response.status_code == 400
    assert response.json()["errors"][0]["message"] == "Cannot edit a reserved ticket"
    assert shown["version"] == 2  # reserved, then sold


async def test_order_events_drive_the_ticket(tickets: Platform) -> None:
    """order:created reserves, a stranger's order:cancelled does nothing, order:completed sells."""
    async with tickets.client(new_user()) as c:
        ticket = await create(c)
    runtime = tickets.runtime("tickets")
    order = _order_created(ticket, str(uuid.uuid4()))
    from ticketing.common.events import Envelope

    await runtime.publisher.publish(Envelope.wrap(order))
    shown = await eventually(lambda: _ticket_if(tickets, ticket["id"], version=1))
    assert shown["orderId"] == order.id
    stranger = OrderCancelled(id=str(uuid.uuid4()), version=1, ticket={"id": ticket["id"]})
    await runtime.publisher.publish(Envelope.wrap(stranger))
    await eventually(lambda: consumer_settled(runtime.bus, "tickets"))
    assert await _ticket_if(tickets, ticket["id"], version=1) == shown  # still held, as it was
    await runtime.publisher.publish(
        Envelope.wrap(OrderCompleted(id=order.id, version=1, ticket={"id": ticket["id"]}))
    )
    sold = await eventually(lambda: _ticket_if(tickets, ticket["id"], version=2))
    assert sold["orderId"] == order.id
    async with tickets.client() as anonymous:
        assert (await anonymous.get("/api/tickets")).json() == []


def _order_created(ticket: dict[str, Any], order_id: str) -> OrderCreated:
    return OrderCreated.model_validate(
        {
            "id": order_id,
            "version": 0,
            "status": "created",
            "userId": new_user(),
            "expiresAt": "2030-01-01T00:00:00Z",
            "ticket": {"id": ticket["id"], "price": ticket["price"]},
        }
    )


async def _ticket_if(platform: Platform, ticket_id: str, *, version: int) -> dict[str, Any]:
    async with platform.client() as c:
        shown = dict((await c.get(f"/api/tickets/{ticket_id}")).json())
    return shown if shown["version"] == version else {}


@pytest.mark.parametrize("title", [r"a\ud800b", r"nul\u0000byte"])
async def test_text_that_cannot_be_stored_is_400(tickets: Platform, title: str) -> None:
    # Raw JSON, so that the escapes reach the server as escapes.
    body = '{"title": "TITLE", "price": 10}'.replace("TITLE", title).encode()
    async with tickets.client(new_user()) as c:
        response = await c.post(
            "/api/tickets", content=body, headers={"content-type": "application/json"}
        )
    assert response.status_code == 400
    assert response.json()["errors"] == [{"message": "Title must be plain text", "field": "title"}]
