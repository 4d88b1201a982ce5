"""The payments contract against the local Stripe sandbox, through the official SDK."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from tests.conftest import Platform, new_user
from tests.payments.conftest import WEBHOOK_SECRET, seed_order
from tests.support import eventually, stream_envelopes
from ticketing.common import messaging
from ticketing.common.errors import NotFound
from ticketing.common.events import Envelope, OrderCancelled, TicketRef
from ticketing.payments import service
from ticketing.payments.charges import Charges
from ticketing.payments.models import OrderReplica, Payment
from ticketing.platform.stripe_sandbox import SandboxServer, sign_payload


async def pay(client: httpx.AsyncClient, order_id: str, token: str = "tok_visa") -> httpx.Response:
    return await client.post("/api/payments", json={"orderId": order_id, "token": token})


def charges(sandbox: SandboxServer) -> list[dict[str, Any]]:
    return list(sandbox.app.state.sandbox.charges)


async def payments(platform: Platform) -> list[Payment]:
    async with platform.runtime("payments").db.transaction() as session:
        return list(await session.scalars(select(Payment).order_by(Payment.created_at)))


def error(response: httpx.Response) -> str:
    return str(response.json()["errors"][0]["message"])


async def test_paying_charges_the_card_and_publishes_payment_created(
    shop: Platform, sandbox: SandboxServer
) -> None:
    order = await seed_order(shop, price="20.50")
    async with shop.client(order.user_id) as buyer:
        response = await pay(buyer, order.id)
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"id"}
    [charge] = charges(sandbox)
    assert charge["amount"] == 2050
    assert charge["currency"] == "usd"
    assert charge["metadata"] == {"orderId": order.id}
    [payment] = await payments(shop)
    assert payment.id == body["id"]
    published = await eventually(
        lambda: stream_envelopes(shop.runtime("payments").bus, "payment:created")
    )
    assert [e.data for e in published] == [
        {"id": body["id"], "orderId": order.id, "stripeId": payment.stripe_id}
    ]


async def test_validation_and_access(shop: Platform) -> None:
    order = await seed_order(shop)
    async with shop.client() as anonymous:
        assert (await pay(anonymous, order.id)).status_code == 401
    async with shop.client(order.user_id) as buyer:
        missing = await buyer.post("/api/payments", json={})
        assert missing.status_code == 400
        assert missing.json()["errors"] == [
            {"message": "OrderId must be provided", "field": "orderId"},
            {"message": "Token must be provided", "field": "token"},
        ]
        for unknown_id in (str(uuid.uuid4()), "not-an-id"):
            unknown = await pay(buyer, unknown_id)
            assert unknown.status_code == 404
            assert error(unknown) == "Order not found"
    async with shop.client(new_user()) as stranger:
        assert (await pay(stranger, order.id)).status_code == 401


async def test_a_cancelled_order_cannot_be_paid(shop: Platform, sandbox: SandboxServer) -> None:
    order = await seed_order(shop)
    runtime = shop.runtime("payments")
    await runtime.publisher.publish(
        Envelope.wrap(OrderCancelled(id=order.id, version=1, ticket=TicketRef(id=order.ticket.id)))
    )

    await eventually(lambda: _replica_status(shop, order.id, "cancelled"))
    async with shop.client(order.user_id) as buyer:
        response = await pay(buyer, order.id)
    assert response.status_code == 400
    assert error(response) == "Cannot pay for a cancelled order"
    assert charges(sandbox) == []


async def _replica_status(platform: Platform, order_id: str, status: str) -> bool:
    async with platform.runtime("payments").db.transaction() as session:
        order = await session.get(OrderReplica, order_id)
    return order is not None and order.status == status


async def test_an_order_is_paid_once(shop: Platform, sandbox: SandboxServer) -> None:
    order = await seed_order(shop)
    async with shop.client(order.user_id) as buyer:
        assert (await pay(buyer, order.id)).status_code == 201
        again = await pay(buyer, order.id)
    assert again.status_code == 400
    assert error(again) == "This order has already been paid"
    assert len(charges(sandbox)) == 1


async def test_an_expired_order_cannot_be_paid(shop: Platform, sandbox: SandboxServer) -> None:
    order = await seed_order(shop, expires_in=-1)
    async with shop.client(order.user_id) as buyer:
        response = await pay(buyer, order.id)
    assert response.status_code == 400
    assert error(response) == "Cannot pay for an expired order"
    assert charges(sandbox) == []


async def test_a_declined_card_is_402_and_a_new_card_can_still_pay(
    shop: Platform, sandbox: SandboxServer
) -> None:
    order = await seed_order(shop)
    async with shop.client(order.user_id) as buyer:
        declined = await pay(buyer, order.id, "tok_chargeDeclined")
        assert declined.status_code == 402
        assert error(declined) == "Your card was declined."
        declined_again = await pay(buyer, order.id, "tok_chargeDeclined")
        assert declined_again.status_code == 402
        paid = await pay(buyer, order.id, "tok_visa")
    assert paid.status_code == 201
    assert len(charges(sandbox)) == 1


@pytest.mark.parametrize(("price", "cents"), [("0.50", 50), ("999999.99", 99999999)])
async def test_the_prices_a_ticket_may_have_can_be_paid(
    shop: Platform, sandbox: SandboxServer, price: str, cents: int
) -> None:
    """The tickets service lists prices within these bounds: the card can pay them all."""
    order = await seed_order(shop, price=price)
    async with shop.client(order.user_id) as buyer:
        assert (await pay(buyer, order.id)).status_code == 201
    assert [c["amount"] for c in charges(sandbox)] == [cents]


async def test_an_order_under_what_a_card_can_pay_is_refused_before_any_charge(
    shop: Platform, sandbox: SandboxServer
) -> None:
    order = await seed_order(shop, price="0.49")
    async with shop.client(order.user_id) as buyer:
        refused = await pay(buyer, order.id)
    assert refused.status_code == 400
    assert refused.json() == {
        "errors": [{"message": "A card can pay 0.50 or more, not less", "field": None}]
    }
    assert charges(sandbox) == []


async def test_an_unknown_card_token_is_400_and_a_real_card_can_still_pay(
    shop: Platform, sandbox: SandboxServer
) -> None:
    """Stripe refuses a token it does not know: a wrong request, not a declined card. Nor is it
    an attempt (Stripe keeps nothing under a key whose request it refused up front): the card
    after it charges under the first attempt's key. Counted, a good card sent meanwhile (under
    that key) and one sent after the refusal (under the next) would both charge."""
    order = await seed_order(shop)
    async with shop.client(order.user_id) as buyer:
        refused = await pay(buyer, order.id, "tok_bogus")
        assert refused.status_code == 400
        assert refused.json() == {
            "errors": [{"message": "Token is not a valid card token", "field": "token"}]
        }
        assert charges(sandbox) == []
        paid = await pay(buyer, order.id, "tok_visa")
    assert paid.status_code == 201
    assert len(charges(sandbox)) == 1
    keys = [key for _api_key, key in sandbox.app.state.sandbox.saved if order.id in key]
    assert keys and all(f"order-{order.id}-attempt-1" in key for key in keys), keys


async def test_concurrent_retries_of_one_request_charge_once(
    shop: Platform, sandbox: SandboxServer
) -> None:
    order = await seed_order(shop)
    async with shop.client(order.user_id) as buyer:
        responses = await asyncio.gather(*(pay(buyer, order.id) for _ in range(4)))
    created = [r.json()["id"] for r in responses if r.status_code == 201]
    refused = [error(r) for r in responses if r.status_code != 201]
    assert created, [r.text for r in responses]
    assert len(set(created)) == 1
    assert set(refused) <= {"This order has already been paid"}
    assert len(charges(sandbox)) == 1
    assert len(await payments(shop)) == 1


async def test_two_cards_at_once_charge_once_and_the_other_is_told_why(
    shop: Platform, sandbox: SandboxServer
) -> None:
    """Two payments of one order at once with different cards share the attempt's key: Stripe
    refuses the second while the first is under way, which is a lost race, not an outage."""
    for _ in range(5):
        order = await seed_order(shop)
        async with shop.client(order.user_id) as buyer:
            answers = await asyncio.gather(
                pay(buyer, order.id, "tok_visa"), pay(buyer, order.id, "tok_mastercard")
            )
        statuses = sorted(a.status_code for a in answers)
        assert statuses in ([201, 400], [201, 409]), [a.text for a in answers]
        lost = next(a for a in answers if a.status_code != 201)
        assert error(lost) in {
            "This order has already been paid",
            "A payment for this order is already under way",
        }
    assert len(charges(sandbox)) == 5


async def test_a_retry_after_a_lost_response_reuses_the_charge(
    shop: Platform, sandbox: SandboxServer
) -> None:
    """The first request charged the card, then died before recording it; the retry must not
    charge again: it reaches the sandbox with the same idempotency key."""
    order = await seed_order(shop)
    gateway = shop.apps["payments"].state.charges
    first = await gateway.charge(
        amount_cents=2000,
        token="tok_visa",
        order_id=order.id,
        idempotency_key=f"order-{order.id}-attempt-1",
    )
    async with shop.client(order.user_id) as buyer:
        response = await pay(buyer, order.id)
    assert response.status_code == 201
    assert len(charges(sandbox)) == 1
    [payment] = await payments(shop)
    assert payment.stripe_id == first


async def test_a_payment_that_lands_after_the_order_was_cancelled_is_refunded(
    shop: Platform, sandbox: SandboxServer
) -> None:
    order = await seed_order(shop)
    async with shop.client(order.user_id) as buyer:
        assert (await pay(buyer, order.id)).status_code == 201
    # The expiry won the race in the orders service: it cancelled the order anyway.
    await shop.runtime("payments").publisher.publish(
        Envelope.wrap(OrderCancelled(id=order.id, version=1, ticket=TicketRef(id=order.ticket.id)))
    )

    async def refunded() -> list[Payment]:
        found = await payments(shop)
        return found if found and found[0].status == "refunded" else []

    [payment] = await eventually(refunded)
    assert payment.note == "Refunded: the order was cancelled before the payment completed"
    assert payment.refund_id
    assert charges(sandbox)[0]["refunded"] is True


def webhook_body(intent_id: str, order_id: str, amount: int = 2000) -> bytes:
    event = {
        "id": f"evt_{uuid.uuid4().hex}",
        "object": "event",
        "type": "payment_intent.succeeded",
        "created": int(time.time()),
        "livemode": False,
        "data": {
            "object": {
                "id": intent_id,
                "object": "payment_intent",
                "amount": amount,
                "currency": "usd",
                "status": "succeeded",
                "metadata": {"orderId": order_id},
            }
        },
    }
    return json.dumps(event).encode()


async def post_webhook(platform: Platform, body: bytes, secret: str) -> httpx.Response:
    async with platform.client() as stripe_itself:
        return await stripe_itself.post(
            "/api/payments/webhook",
            content=body,
            headers={
                "Stripe-Signature": sign_payload(body, secret),
                "content-type": "application/json",
            },
        )


async def test_a_signed_webhook_records_the_payment_and_a_replay_is_harmless(
    shop: Platform,
) -> None:
    order = await seed_order(shop)
    body = webhook_body("pi_from_webhook", order.id)
    first = await post_webhook(shop, body, WEBHOOK_SECRET)
    replay = await post_webhook(shop, body, WEBHOOK_SECRET)
    assert first.status_code == 200
    assert replay.status_code == 200
    [payment] = await payments(shop)
    assert payment.stripe_id == "pi_from_webhook"
    assert payment.status == "succeeded"
    published = await eventually(
        lambda: stream_envelopes(shop.runtime("payments").bus, "payment:created")
    )
    assert len(published) == 1
    # The synchronous path then finds the order paid.
    async with shop.client(order.user_id) as buyer:
        assert error(await pay(buyer, order.id)) == "This order has already been paid"


@pytest.mark.parametrize(("amount", "currency"), [(50, "usd"), (2000, "eur")])
async def test_a_charge_that_is_not_the_orders_price_does_not_pay_for_it(
    shop: Platform, sandbox: SandboxServer, amount: int, currency: str
) -> None:
    """Anything on the account may create a PaymentIntent naming an order: its webhook pays for
    the order only at the order's price, in usd; otherwise the charge is refunded."""
    order = await seed_order(shop, price="20")
    made: Charges = shop.apps["payments"].state.charges
    intent = await made.charge(
        amount_cents=amount, token="tok_visa", order_id=order.id, idempotency_key="elsewhere"
    )
    event = json.loads(webhook_body(intent, order.id, amount))
    event["data"]["object"]["currency"] = currency
    answer = await post_webhook(shop, json.dumps(event).encode(), WEBHOOK_SECRET)
    assert answer.status_code == 200
    [payment] = await payments(shop)
    assert (payment.status, payment.note) == ("refunded", service.WRONG_AMOUNT_NOTE)
    assert charges(sandbox)[0]["refunded"] is True
    async with shop.client(order.user_id) as buyer:
        assert (await pay(buyer, order.id)).status_code == 201  # still unpaid until now


async def test_a_forged_webhook_is_rejected(shop: Platform) -> None:
    order = await seed_order(shop)
    body = webhook_body("pi_forged", order.id)
    response = await post_webhook(shop, body, "whsec_someone_else")
    assert response.status_code == 400
    assert error(response) == "Invalid webhook signature"
    async with shop.client() as c:
        unsigned = await c.post("/api/payments/webhook", content=body)
    assert unsigned.status_code == 400
    assert await payments(shop) == []


_SUCCEEDED = "payment_intent.succeeded"
_INTENT = {"id": "pi_1", "amount": 2000, "currency": "usd", "metadata": {"orderId": "o"}}


@pytest.mark.parametrize(
    "event",
    [
        [],
        None,
        {"type": _SUCCEEDED},
        {"type": _SUCCEEDED, "data": []},
        {"type": _SUCCEEDED, "data": {"object": "pi_1"}},
        {"type": _SUCCEEDED, "data": {"object": {"amount": 2000, "currency": "usd"}}},
        {"type": _SUCCEEDED, "data": {"object": {"id": "pi_1", "amount": "1", "currency": "usd"}}},
        {"type": _SUCCEEDED, "data": {"object": {**_INTENT, "metadata": "x"}}},
        {"type": _SUCCEEDED, "data": {"object": {**_INTENT, "id": "pi_\u0000x"}}},
        {"type": _SUCCEEDED, "data": {"object": {**_INTENT, "id": "pi_" + "x" * 300}}},
        {"type": _SUCCEEDED, "data": {"object": {**_INTENT, "amount": 2**40}}},
        {"type": _SUCCEEDED, "data": {"object": {**_INTENT, "currency": "US dollars"}}},
    ],
)  # fmt: skip
async def test_a_signed_webhook_that_is_not_a_stripe_event_is_400(
    shop: Platform, event: Any
) -> None:
    """Signed with the right secret (the dev one is public) but not shaped as Stripe's."""
    response = await post_webhook(shop, json.dumps(event).encode(), WEBHOOK_SECRET)
    assert response.status_code == 400
    assert list(response.json()) == ["errors"]
    assert await payments(shop) == []


async def test_a_signed_webhook_nested_too_deep_to_parse_is_400(shop: Platform) -> None:
    response = await post_webhook(shop, b"[" * 100_000, WEBHOOK_SECRET)
    assert response.status_code == 400
    assert list(response.json()) == ["errors"]


@pytest.mark.parametrize("order_id", ["not-an-id", "", 7, "6f1c2a5e-8d3b-4c7a-9e0f-1b2c3d4e5f60"])
async def test_a_succeeded_intent_naming_no_order_of_ours_is_acknowledged(
    shop: Platform, order_id: Any
) -> None:
    event = json.loads(webhook_body("pi_elsewhere", "x"))
    event["data"]["object"]["metadata"] = {"orderId": order_id}
    response = await post_webhook(shop, json.dumps(event).encode(), WEBHOOK_SECRET)
    expected = 200 if isinstance(order_id, str) else 400  # Stripe's metadata are strings
    assert response.status_code == expected
    assert await payments(shop) == []


async def test_a_token_that_is_not_a_token_is_400(shop: Platform, sandbox: SandboxServer) -> None:
    order = await seed_order(shop)
    body = '{"orderId": "ID", "token": "tok_\\ud800"}'.replace("ID", order.id).encode()
    async with shop.client(order.user_id) as buyer:
        response = await buyer.post(
            "/api/payments", content=body, headers={"content-type": "application/json"}
        )
    assert response.status_code == 400
    assert response.json()["errors"] == [
        {"message": "Token is not a valid card token", "field": "token"}
    ]
    assert charges(sandbox) == []


async def test_a_double_click_with_a_declined_card_is_two_declines(
    shop: Platform, sandbox: SandboxServer
) -> None:
    order = await seed_order(shop)
    async with shop.client(order.user_id) as buyer:
        responses = await asyncio.gather(
            pay(buyer, order.id, "tok_chargeDeclined"), pay(buyer, order.id, "tok_chargeDeclined")
        )
        assert [r.status_code for r in responses] == [402, 402]
        assert (await pay(buyer, order.id)).status_code == 201
    assert len(charges(sandbox)) == 1


async def test_paying_at_once_waits_for_the_order_to_reach_the_replica(
    shop: Platform, sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order's 201 can reach the buyer before order:created reaches payments."""
    missed = asyncio.Event()
    payable = service._payable

    async def noting_a_miss(session: AsyncSession, **key: str) -> OrderReplica:
        try:
            return await payable(session, **key)
        except NotFound:
            missed.set()
            raise

    monkeypatch.setattr(service, "_payable", noting_a_miss)
    # Long enough for the order to arrive however slow the machine: the wait ends when it does.
    monkeypatch.setattr(messaging, "REPLICA_WAIT_SECONDS", 30.0)
    buyer_id = new_user()
    order_id = str(uuid.uuid4())
    async with shop.client(buyer_id) as buyer:
        paying = asyncio.create_task(pay(buyer, order_id))
        await asyncio.wait_for(missed.wait(), timeout=5)
        await seed_order(shop, buyer=buyer_id, order_id=order_id, price="12")
        response = await paying
    assert response.status_code == 201
    [charge] = charges(sandbox)
    assert charge["amount"] == 1200
    assert charge["metadata"] == {"orderId": order_id}


async def test_orders_created_together_are_replicated_each_once(shop: Platform) -> None:
    """One statement for them all; an order already in the replica is left as it is."""
    known = await seed_order(shop, price="20")
    cancelled = known.model_copy(update={"status": "cancelled", "version": 1})
    fresh = [(await seed_order(shop)).model_copy(update={"id": str(uuid.uuid4())}) for _ in "ab"]
    async with shop.runtime("payments").db.transaction() as session:
        # The same order twice in one call, as a redelivery may bring it: once.
        await service.orders_created(session, [cancelled, *fresh, fresh[0]])
    async with shop.runtime("payments").db.transaction() as session:
        rows = {o.id: o for o in await session.scalars(select(OrderReplica))}
    assert (rows[known.id].status, rows[known.id].version) == ("created", 0)
    assert [(rows[o.id].user_id, rows[o.id].version) for o in fresh] == [
        (o.user_id, 0) for o in fresh
    ]


async def test_an_order_not_replicated_yet_is_a_503_while_payments_is_behind(
    shop: Platform, sandbox: SandboxServer
) -> None:
    """Its order:created on the stream but not handled here (the events worker restarting):
    come back in a moment, not 'Order not found'; once handled, the payment goes through."""
    from ticketing.common.events import OrderCreated

    runtime = shop.runtime("payments")
    await runtime.listener.stop()
    buyer = new_user()
    order = OrderCreated.model_validate(
        {
            "id": str(uuid.uuid4()), "version": 0, "status": "created", "userId": buyer,
            "expiresAt": "2099-01-01T00:00:00Z", "ticket": {"id": str(uuid.uuid4()), "price": 20},
        }
    )  # fmt: skip
    await runtime.publisher.publish(Envelope.wrap(order))
    async with shop.client(buyer) as client:
        behind = await pay(client, order.id)
        unknown = await pay(client, str(uuid.uuid4()))
        await runtime.listener.start()
        caught_up = await pay(client, order.id)
    assert behind.status_code == 503
    assert error(behind) == "Payments are catching up; please try again in a moment"
    assert unknown.status_code == 503  # cannot tell it apart from one on the way
    assert caught_up.status_code == 201
    assert len(charges(sandbox)) == 1


async def test_an_unknown_order_is_404_once_payments_has_caught_up(shop: Platform) -> None:
    async with shop.client(new_user()) as client:
        answer = await pay(client, str(uuid.uuid4()))
    assert (answer.status_code, error(answer)) == (404, "Order not found")
