"""Charges and refunds through the official Stripe SDK (Stripe, or the local sandbox)."""

from __future__ import annotations

import logging
from typing import cast

import stripe
from stripe._base_address import BaseAddresses
from stripe.params import PaymentIntentCreateParams

from ticketing.common.errors import Conflict, ServiceUnavailable
from ticketing.payments.settings import PaymentsSettings

log = logging.getLogger(__name__)


class CardDeclined(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ChargeRefused(Exception):
    """The provider refused the request itself for what the buyer sent (a token it does not
    know): the buyer's request was wrong, not the card."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class Charges:
    """The few Stripe calls payments makes, each with an idempotency key."""

    def __init__(self, settings: PaymentsSettings) -> None:
        settings.require_urls("stripe_secret_key")
        assert settings.stripe_secret_key is not None
        bases: BaseAddresses = {}
        if settings.stripe_api_base:
            bases["api"] = settings.stripe_api_base
        self.client = stripe.StripeClient(
            settings.stripe_secret_key,
            base_addresses=bases,
            http_client=stripe.HTTPXClient(),
            # The SDK retries network failures with the same idempotency key: safe to retry.
            max_network_retries=2,
        )

    async def charge(
        self, *, amount_cents: int, token: str, order_id: str, idempotency_key: str
    ) -> str:
        """Charge the card now; the PaymentIntent id, or CardDeclined, or ChargeRefused."""
        # Card tokens (tok_visa...) go in payment_method_data[card][token], which the API
        # accepts though the SDK's typed params leave it out; hence the cast.
        params = cast(
            PaymentIntentCreateParams,
            {
                "amount": amount_cents,
                "currency": "usd",
                "confirm": True,
                "automatic_payment_methods": {"enabled": True, "allow_redirects": "never"},
                "payment_method_data": {"type": "card", "card": {"token": token}},
                "metadata": {"orderId": order_id},
            },
        )
        try:
            intent = await self.client.v1.payment_intents.create_async(
                params, {"idempotency_key": idempotency_key}
            )
        except stripe.CardError as exc:
            raise CardDeclined(exc.user_message or "Your card was declined.") from exc
        except stripe.IdempotencyError as exc:
            # The same attempt's key, sent again with another card while the first request
            # is under way (two payments at once): that one decides.
            raise Conflict("A payment for this order is already under way") from exc
        except stripe.InvalidRequestError as exc:
            if exc.code == "resource_missing" and "token" in (exc.param or ""):
                raise ChargeRefused("Token is not a valid card token", field="token") from exc
            # Nothing else the buyer sends reaches Stripe (an order under the least a card can
            # pay is refused before the charge): a refusal of the rest is this service's to fix.
            log.error("stripe refused the charge request: %r", exc)
            raise ServiceUnavailable("The payment provider is unavailable; try again") from exc
        except stripe.StripeError as exc:
            log.warning("stripe unavailable: %r", exc)
            raise ServiceUnavailable("The payment provider is unavailable; try again") from exc
        if intent.status != "succeeded":
            raise CardDeclined(f"The payment did not complete ({intent.status}).")
        return intent.id

    async def refund(self, *, payment_intent: str) -> str:
        """Refund a charge in full; a retry refunds nothing more."""
        try:
            refund = await self.client.v1.refunds.create_async(
                {"payment_intent": payment_intent}, {"idempotency_key": f"refund-{payment_intent}"}
            )
        except stripe.StripeError as exc:
            log.warning("refund of %s failed: %r", payment_intent, exc)
            raise ServiceUnavailable(
                "The refund could not be made yet; it will be retried"
            ) from exc
        return refund.id
