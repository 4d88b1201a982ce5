"""HTTP routes of the payments service: a thin adapter over service.py."""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

import stripe
from fastapi import APIRouter, Depends, Header, Request
from pydantic import ValidationError

from ticketing.common.app import Runtime, RuntimeDep
from ticketing.common.auth import RequireUser
from ticketing.common.errors import BadRequest, NotFound, ServiceUnavailable
from ticketing.common.ids import canonical_id, is_id
from ticketing.common.messaging import RetryLater
from ticketing.common.openapi import error_responses
from ticketing.payments import service
from ticketing.payments.charges import Charges
from ticketing.payments.schemas import PaymentBody, PaymentOut, SucceededIntent
from ticketing.payments.settings import PaymentsSettings

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/payments", tags=["payments"])


async def _charges(request: Request) -> Charges:
    charges: Charges = request.app.state.charges
    return charges


ChargesDep = Annotated[Charges, Depends(_charges)]


@router.post("", status_code=201, responses=error_responses(401, 402, 404))
async def create_payment(
    body: PaymentBody, user: RequireUser, runtime: RuntimeDep, charges: ChargesDep
) -> PaymentOut:
    # An order its buyer was just told is cancelled (the DELETE's 204 waits for order:cancelled
    # to be on the stream) reads cancelled here before a charge is decided, instead of being
    # charged and then refunded. After a second the charge goes ahead: the cancellation, once
    # handled, refunds it.
    await runtime.listener.has_handled("order:cancelled")
    try:
        payment = await service.pay(
            runtime.db, charges, order_id=body.orderId, user_id=user.id, token=body.token
        )
    except NotFound:
        await _unknown_or_behind(runtime, body.orderId)
        payment = await service.pay(  # it has come in: being handled, perhaps
            runtime.db, charges, order_id=body.orderId, user_id=user.id, token=body.token
        )
    return PaymentOut(id=payment.id)


async def _unknown_or_behind(runtime: Runtime, order_id: str) -> None:
    """An order this service does not know: unknown, or its order:created still on the way
    (this service's events behind, as while its events worker restarts). A 503 while they
    are behind, not the 404 of an order that does not exist."""
    if not is_id(order_id):
        raise NotFound("Order not found")
    if not await runtime.listener.has_received("order:created"):
        raise ServiceUnavailable("Payments are catching up; please try again in a moment")


@router.post("/webhook", responses=error_responses(400))
async def stripe_webhook(
    request: Request,
    runtime: RuntimeDep,
    charges: ChargesDep,
    stripe_signature: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    """Stripe's events, signature verified; payment_intent.succeeded records the payment."""
    settings: PaymentsSettings = request.app.state.settings
    payload = await request.body()
    try:
        text = payload.decode()
        stripe.WebhookSignature.verify_header(
            text, stripe_signature, settings.stripe_webhook_secret
        )
    except (ValueError, stripe.SignatureVerificationError):
        raise BadRequest("Invalid webhook signature") from None
    event = _parsed(text)  # not through the SDK, which assumes a well-formed event
    if event.get("type") == "payment_intent.succeeded":
        intent = _succeeded_intent(event)
        order_id = canonical_id(intent.metadata.get("orderId", ""))
        # An intent naming no order of ours (made elsewhere on the account) has nothing to pay.
        if is_id(order_id):
            amount = service.Amount(intent.amount, intent.currency)
            await _record(runtime, charges, order_id, intent.id, amount)
    return {"received": True}


def _parsed(text: str) -> dict[str, Any]:
    try:
        event = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested too deep to parse
        event = None
    if not isinstance(event, dict):
        raise BadRequest("A webhook carries a Stripe event object")
    return event


def _succeeded_intent(event: dict[str, Any]) -> SucceededIntent:
    data = event.get("data")
    intent = data.get("object") if isinstance(data, dict) else None
    try:
        return SucceededIntent.model_validate(intent)
    except ValidationError:
        raise BadRequest("A payment_intent.succeeded event carries its payment intent") from None


async def _record(
    runtime: Runtime, charges: Charges, order_id: str, stripe_id: str, amount: service.Amount
) -> None:
    async def record() -> None:
        await service.record_charge(
            runtime.db, charges, order_id=order_id, stripe_id=stripe_id, amount=amount
        )

    try:
        await record()
    except RetryLater as early:
        if not await runtime.listener.has_received("order:created"):
            # Stripe retries a webhook that is not acknowledged: let it come back later.
            raise ServiceUnavailable(f"Not ready for this event yet: {early}") from None
        try:
            await record()  # every order created before now has come in
        except RetryLater:
            # No order of ours: acknowledged, or Stripe would send it again for days.
            log.warning("charge %s names order %s, unknown here: ignored", stripe_id, order_id)
