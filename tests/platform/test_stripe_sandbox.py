"""The Stripe sandbox, driven over real HTTP by the official SDK, as the payments service does."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import stripe
from fastapi import FastAPI, Request, Response

from tests.support import eventually
from ticketing.platform.gateway import Gateway
from ticketing.platform.stripe_sandbox import (
    AppServer,
    Delivery,
    SandboxServer,
    create_sandbox_app,
    sign_payload,
)

API_KEY = "sk_test_sandbox"
SECRET = "whsec_test_sandbox"
# stripe's HTTPXClient posts bytes as `data=`; the SDK's warning, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


def visa(**extra: Any) -> dict[str, Any]:
    return card("tok_visa", **extra)


def card(token: str, **extra: Any) -> dict[str, Any]:
    """Create-params as the payments service sends them."""
    return {
        "amount": 2000,
        "currency": "usd",
        "confirm": True,
        "payment_method_data": {"type": "card", "card": {"token": token}},
        "payment_method_types": ["card"],
        "metadata": {"orderId": "abc"},
        **extra,
    }


@pytest.fixture
async def server() -> AsyncIterator[SandboxServer]:
    started = SandboxServer()
    await started.start()
    yield started
    await started.stop()


@pytest.fixture
async def http_client() -> AsyncIterator[stripe.HTTPXClient]:
    http = stripe.HTTPXClient()
    yield http
    await http.close_async()


def sdk(base: str, http: stripe.HTTPXClient, api_key: str = API_KEY) -> stripe.StripeClient:
    return stripe.StripeClient(
        api_key, base_addresses={"api": base}, http_client=http, max_network_retries=0
    )


@pytest.fixture
def client(server: SandboxServer, http_client: stripe.HTTPXClient) -> stripe.StripeClient:
    return sdk(server.url, http_client)


async def test_visa_payment_succeeds(client: stripe.StripeClient, server: SandboxServer) -> None:
    intent = await client.v1.payment_intents.create_async(visa(), {"idempotency_key": "order-1"})

    assert intent.object == "payment_intent" and intent.id.startswith("pi_")
    assert intent.status == "succeeded"
    assert (intent.amount, intent.amount_received, intent.currency) == (2000, 2000, "usd")
    assert intent.metadata.to_dict() == {"orderId": "abc"}
    assert intent.livemode is False and intent.client_secret
    [charge] = server.sandbox.charges
    assert charge["id"] == intent.latest_charge
    assert (charge["payment_intent"], charge["amount"], charge["refunded"]) == (
        intent.id,
        2000,
        False,
    )
    assert charge["metadata"] == {"orderId": "abc"}
    fetched = await client.v1.payment_intents.retrieve_async(intent.id)
    assert (fetched.id, fetched.status) == (intent.id, "succeeded")


async def test_declined_card_raises_card_error(
    client: stripe.StripeClient, server: SandboxServer
) -> None:
    with pytest.raises(stripe.CardError) as declined:
        await client.v1.payment_intents.create_async(card("tok_chargeDeclined"))

    error = declined.value
    assert (error.http_status, error.code) == (402, "card_declined")
    assert error.user_message == "Your card was declined."
    assert error.error is not None and error.error.decline_code == "generic_decline"
    intent = error.error.payment_intent
    assert intent is not None and intent.status == "requires_payment_method"
    assert server.sandbox.charges == []
    fetched = await client.v1.payment_intents.retrieve_async(intent.id)
    assert fetched.last_payment_error is not None
    assert fetched.last_payment_error.code == "card_declined"


async def test_same_idempotency_key_charges_once(
    client: stripe.StripeClient, server: SandboxServer
) -> None:
    first = await client.v1.payment_intents.create_async(visa(), {"idempotency_key": "order-2"})
    again = await client.v1.payment_intents.create_async(visa(), {"idempotency_key": "order-2"})

    assert again.id == first.id and again.status == "succeeded"
    assert len(server.sandbox.charges) == 1 and len(server.sandbox.payment_intents) == 1
    assert again.last_response is not None
    assert again.last_response.headers["Idempotent-Replayed"] == "true"


async def test_concurrent_retries_charge_once(
    client: stripe.StripeClient, server: SandboxServer
) -> None:
    create = client.v1.payment_intents.create_async
    intents = await asyncio.gather(*(create(visa(), {"idempotency_key": "k"}) for _ in range(5)))

    assert len({intent.id for intent in intents}) == 1
    assert len(server.sandbox.charges) == 1


async def test_same_key_different_params_is_refused(
    client: stripe.StripeClient, server: SandboxServer
) -> None:
    await client.v1.payment_intents.create_async(visa(), {"idempotency_key": "order-3"})

    with pytest.raises(stripe.IdempotencyError) as refused:
        await client.v1.payment_intents.create_async(
            visa(amount=2500), {"idempotency_key": "order-3"}
        )

    assert refused.value.http_status == 400
    assert len(server.sandbox.charges) == 1


async def test_declines_are_replayed_for_the_same_key(
    client: stripe.StripeClient, server: SandboxServer
) -> None:
    errors = []
    for _ in range(2):
        with pytest.raises(stripe.CardError) as declined:
            await client.v1.payment_intents.create_async(
                card("tok_chargeDeclined"), {"idempotency_key": "order-4"}
            )
        errors.append(declined.value)

    first, again = (e.error.payment_intent for e in errors if e.error is not None)
    assert first is not None and again is not None and first.id == again.id
    assert (errors[1].headers or {}).get("idempotent-replayed") == "true"
    assert len(server.sandbox.payment_intents) == 1


async def test_decline_then_new_key_with_good_card_succeeds(
    client: stripe.StripeClient, server: SandboxServer
) -> None:
    with pytest.raises(stripe.CardError):
        await client.v1.payment_intents.create_async(
            card("tok_chargeDeclined"), {"idempotency_key": "order-5-try-1"}
        )
    intent = await client.v1.payment_intents.create_async(
        visa(), {"idempotency_key": "order-5-try-2"}
    )

    assert intent.status == "succeeded"
    assert [c["payment_intent"] for c in server.sandbox.charges] == [intent.id]


async def test_rejected_params_do_not_use_up_the_key(
    client: stripe.StripeClient, server: SandboxServer
) -> None:
    create = client.v1.payment_intents.create_async
    with pytest.raises(stripe.InvalidRequestError) as bad_amount:
        await create(visa(amount=0), {"idempotency_key": "order-6"})
    with pytest.raises(stripe.InvalidRequestError) as bad_currency:
        await create(visa(currency="zzz"), {"idempotency_key": "order-6"})
    with pytest.raises(stripe.InvalidRequestError) as bad_token:
        await create(card("tok_nope"), {"idempotency_key": "order-6"})

    assert bad_amount.value.param == "amount" and bad_currency.value.param == "currency"
    assert bad_token.value.code == "resource_missing"
    intent = await create(visa(), {"idempotency_key": "order-6"})
    assert intent.status == "succeeded" and len(server.sandbox.charges) == 1


async def test_confirm_later(client: stripe.StripeClient, server: SandboxServer) -> None:
    params = {"amount": 1500, "currency": "eur", "payment_method_types": ["card"]}
    bare = await client.v1.payment_intents.create_async(params)
    ready = await client.v1.payment_intents.create_async(
        {**params, "payment_method": "pm_card_visa"}
    )

    assert bare.status == "requires_payment_method" and ready.status == "requires_confirmation"
    assert server.sandbox.charges == []
    confirmed = await client.v1.payment_intents.confirm_async(ready.id)
    assert confirmed.status == "succeeded" and confirmed.amount_received == 1500
    with pytest.raises(stripe.InvalidRequestError) as twice:
        await client.v1.payment_intents.confirm_async(ready.id)
    assert twice.value.code == "payment_intent_unexpected_state"
    assert len(server.sandbox.charges) == 1


async def test_confirming_without_return_url_needs_card_only(client: stripe.StripeClient) -> None:
    """Real Stripe refuses this, so the sandbox must too, or production fails first."""
    params = visa()
    del params["payment_method_types"]
    with pytest.raises(stripe.InvalidRequestError) as refused:
        await client.v1.payment_intents.create_async(params)
    assert refused.value.param == "return_url"

    no_redirects = {"enabled": True, "allow_redirects": "never"}
    intent = await client.v1.payment_intents.create_async(
        {**params, "automatic_payment_methods": no_redirects}
    )
    assert intent.status == "succeeded"


async def test_refund_once(client: stripe.StripeClient, server: SandboxServer) -> None:
    intent = await client.v1.payment_intents.create_async(visa())

    refund = await client.v1.refunds.create_async({"payment_intent": intent.id})

    assert refund.object == "refund" and refund.id.startswith("re_")
    assert (refund.status, refund.amount, refund.currency) == ("succeeded", 2000, "usd")
    assert refund.payment_intent == intent.id
    assert server.sandbox.charges[0]["refunded"] is True
    with pytest.raises(stripe.InvalidRequestError) as twice:
        await client.v1.refunds.create_async({"payment_intent": intent.id})
    assert twice.value.code == "charge_already_refunded"
    assert len(server.sandbox.refunds) == 1


async def test_retrieve_unknown_intent(client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as missing:
        await client.v1.payment_intents.retrieve_async("pi_unknown")

    assert (missing.value.http_status, missing.value.code) == (404, "resource_missing")


async def test_requests_need_a_secret_key(
    server: SandboxServer, http_client: stripe.HTTPXClient
) -> None:
    with pytest.raises(stripe.AuthenticationError):
        await sdk(server.url, http_client, "pk_test_public").v1.payment_intents.create_async(visa())
    async with httpx.AsyncClient(base_url=server.url) as raw:
        response = await raw.post("/v1/payment_intents", data={"amount": "2000"})

    assert response.status_code == 401
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert server.sandbox.payment_intents == {}


async def test_mounted_under_a_prefix_behind_the_gateway(http_client: stripe.HTTPXClient) -> None:
    gateway = AppServer(Gateway([("/_stripe", create_sandbox_app(prefix="/_stripe"))]))
    await gateway.start()
    try:
        client = sdk(f"{gateway.url}/_stripe", http_client)
        intent = await client.v1.payment_intents.create_async(visa())
        async with httpx.AsyncClient(base_url=gateway.url) as raw:
            charges = (await raw.get("/_stripe/_sandbox/charges")).json()
            unprefixed = await raw.get("/v1/payment_intents/" + intent.id)
    finally:
        await gateway.stop()

    assert [c["payment_intent"] for c in charges] == [intent.id]
    assert unprefixed.status_code == 404


class Receiver:
    """A webhook endpoint that verifies signatures as the payments service must."""

    def __init__(self, *, failures: int = 0) -> None:
        self.events: list[stripe.Event] = []
        self.failures = failures
        self.release = asyncio.Event()
        self.release.set()
        self.app = FastAPI()
        self.app.post("/webhooks/stripe")(self.receive)

    async def receive(self, request: Request) -> Response:
        await self.release.wait()
        if self.failures:
            self.failures -= 1
            return Response(status_code=500)
        payload, signature = await request.body(), request.headers.get("stripe-signature")
        try:
            event = stripe.Webhook.construct_event(payload, signature, SECRET)
        except stripe.SignatureVerificationError:
            return Response(status_code=400)
        self.events.append(event)
        return Response(status_code=200)

    def of_type(self, event_type: str) -> list[stripe.Event]:
        return [event for event in self.events if event.type == event_type]


@pytest.fixture
async def webhooks() -> AsyncIterator[tuple[Receiver, str]]:
    receiver = Receiver()
    served = AppServer(receiver.app)
    await served.start()
    yield receiver, f"{served.url}/webhooks/stripe"
    await served.stop()


def _at_least(items: list[Any], n: int) -> list[Any]:
    return items if len(items) >= n else []


async def serve_sandbox(url: str, secret: str = SECRET) -> SandboxServer:
    server = SandboxServer(webhook_url=url, webhook_secret=secret)
    server.sandbox.retry_delays = (0.05, 0.05, 0.05)
    await server.start()
    return server


async def test_webhooks_arrive_signed(
    webhooks: tuple[Receiver, str], http_client: stripe.HTTPXClient
) -> None:
    receiver, url = webhooks
    server = await serve_sandbox(url)
    try:
        client = sdk(server.url, http_client)
        intent = await client.v1.payment_intents.create_async(visa())
        [succeeded] = await eventually(lambda: receiver.of_type("payment_intent.succeeded"))
        await client.v1.refunds.create_async({"payment_intent": intent.id})
        [refunded] = await eventually(lambda: receiver.of_type("charge.refunded"))
        # The sandbox records a delivery once the receiver's answer is back, just after.
        deliveries = await eventually(lambda: _at_least(server.sandbox.deliveries(), 2))
    finally:
        await server.stop()

    assert succeeded.id.startswith("evt_") and succeeded.livemode is False
    assert succeeded.data.object["id"] == intent.id
    assert succeeded.data.object["status"] == "succeeded"
    assert refunded.data.object["payment_intent"] == intent.id
    assert refunded.data.object["refunded"] is True
    assert [(d.event_type, d.status_code) for d in deliveries] == [
        ("payment_intent.succeeded", 200),
        ("charge.refunded", 200),
    ]


async def test_webhooks_never_hold_up_the_response(
    webhooks: tuple[Receiver, str], http_client: stripe.HTTPXClient
) -> None:
    receiver, url = webhooks
    receiver.release.clear()
    server = await serve_sandbox(url)
    try:
        create = sdk(server.url, http_client).v1.payment_intents.create_async
        # The receiver answers no webhook until released: only a hang is bounded here.
        intent = await asyncio.wait_for(create(visa()), timeout=30)
        assert receiver.events == [] and server.sandbox.deliveries() == []
        receiver.release.set()
        [event] = await eventually(lambda: receiver.of_type("payment_intent.succeeded"))
    finally:
        await server.stop()

    assert event.data.object["id"] == intent.id


async def test_failed_deliveries_are_retried(
    webhooks: tuple[Receiver, str], http_client: stripe.HTTPXClient
) -> None:
    receiver, url = webhooks
    receiver.failures = 2
    server = await serve_sandbox(url)
    try:
        await sdk(server.url, http_client).v1.payment_intents.create_async(visa())
        # A delivery is recorded once its answer is back, a moment after the receiver has it.
        deliveries = await eventually(lambda: _at_least(server.sandbox.deliveries(), 3))
    finally:
        await server.stop()

    assert [(d.attempt, d.status_code) for d in deliveries] == [(1, 500), (2, 500), (3, 200)]
    assert len({d.event_id for d in deliveries}) == 1


async def test_deliveries_signed_with_another_secret_are_refused(
    webhooks: tuple[Receiver, str], http_client: stripe.HTTPXClient
) -> None:
    receiver, url = webhooks
    server = await serve_sandbox(url, secret="whsec_someone_else")
    try:
        await sdk(server.url, http_client).v1.payment_intents.create_async(visa())
        await eventually(lambda: len(server.sandbox.deliveries()) == 4)
        deliveries = server.sandbox.deliveries()
    finally:
        await server.stop()

    assert [d.status_code for d in deliveries] == [400, 400, 400, 400]
    assert receiver.events == []


def test_sign_payload_is_what_construct_event_checks() -> None:
    payload = json.dumps({"id": "evt_1", "object": "event", "type": "ping", "data": {}}).encode()

    event = stripe.Webhook.construct_event(payload, sign_payload(payload, SECRET), SECRET)

    assert event.id == "evt_1"
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(payload, sign_payload(payload, "whsec_wrong"), SECRET)
    stale = sign_payload(payload, SECRET, timestamp=int(time.time()) - 3600)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(payload, stale, SECRET)


def _at_least(items: list[Delivery], count: int) -> list[Delivery] | None:
    return items if len(items) >= count else None
