"""Settings of the payments service."""

from __future__ import annotations

from pydantic import model_validator

from ticketing.common.settings import InsecureSettingsError, Settings, is_placeholder

DEV_WEBHOOK_SECRET = "whsec_dev_only_insecure"
# The key `ticketing up` gives payments for its local Stripe sandbox.
SANDBOX_SECRET_KEY = "sk_test_sandbox"


class PaymentsSettings(Settings):
    stripe_secret_key: str | None = None
    # Unset means Stripe itself; `ticketing up` and the tests point it at the local sandbox.
    stripe_api_base: str | None = None
    stripe_webhook_secret: str = DEV_WEBHOOK_SECRET
    # The listener keeps the default gathering: a buyer who pays the moment the order's 201
    # arrives waits for the replica instead (messaging.REPLICA_WAIT_SECONDS).

    @model_validator(mode="after")
    def _refuse_stand_in_secrets_in_production(self) -> PaymentsSettings:
        if self.env != "production":
            return self
        secret = self.stripe_webhook_secret
        stand_in = secret == DEV_WEBHOOK_SECRET or is_placeholder(secret)
        if stand_in or not secret.startswith("whsec_"):
            raise InsecureSettingsError(
                "TICKETING_STRIPE_WEBHOOK_SECRET must be the endpoint's signing secret (whsec_...)"
                " when TICKETING_ENV=production"
            )
        key = self.stripe_secret_key or ""
        if not key.startswith(("sk_", "rk_")) or is_placeholder(key) or key == SANDBOX_SECRET_KEY:
            raise InsecureSettingsError(
                "TICKETING_STRIPE_SECRET_KEY must be the account's secret key (sk_... or rk_...)"
                " when TICKETING_ENV=production"
            )
        return self
