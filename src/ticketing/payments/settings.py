"""Settings of the payments service."""

from __future__ import annotations

from pydantic import model_validator

from ticketing.common.settings import InsecureSettingsError, Settings

DEV_WEBHOOK_SECRET = "whsec_dev_only_insecure"


class PaymentsSettings(Settings):
    stripe_secret_key: str | None = None
    # Unset means Stripe itself; `ticketing up` and the tests point it at the local sandbox.
    stripe_api_base: str | None = None
    stripe_webhook_secret: str = DEV_WEBHOOK_SECRET
    # The listener keeps the default gathering: a buyer who pays the moment the order's 201
    # arrives waits for the replica instead (messaging.REPLICA_WAIT_SECONDS).

    @model_validator(mode="after")
    def _refuse_dev_webhook_secret_in_production(self) -> PaymentsSettings:
        if self.env == "production" and self.stripe_webhook_secret == DEV_WEBHOOK_SECRET:
            raise InsecureSettingsError(
                "TICKETING_STRIPE_WEBHOOK_SECRET must be set when TICKETING_ENV=production"
            )
        return self
