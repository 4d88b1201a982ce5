"""Production refuses to start on a Stripe secret that is a stand-in for one."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ticketing.payments.settings import DEV_WEBHOOK_SECRET, PaymentsSettings

JWT = "k" * 48
KEY = "sk_live_51abcdefghijklmnop"
WEBHOOK = "whsec_0123456789abcdefghijklmnop"


@pytest.mark.parametrize(
    "webhook", [DEV_WEBHOOK_SECRET, "REPLACE_ME_whsec", "whsec_REPLACE_ME", "not-a-whsec"]
)
def test_a_stand_in_webhook_secret_is_refused(webhook: str) -> None:
    with pytest.raises(ValidationError, match="TICKETING_STRIPE_WEBHOOK_SECRET"):
        PaymentsSettings(
            env="production", jwt_key=JWT, stripe_secret_key=KEY, stripe_webhook_secret=webhook
        )


@pytest.mark.parametrize("key", [None, "", "REPLACE_ME_sk_live", "sk_live_REPLACE_ME", "pk_live_x"])
def test_a_missing_or_stand_in_stripe_key_is_refused(key: str | None) -> None:
    with pytest.raises(ValidationError, match="TICKETING_STRIPE_SECRET_KEY"):
        PaymentsSettings(
            env="production", jwt_key=JWT, stripe_secret_key=key, stripe_webhook_secret=WEBHOOK
        )


def test_real_looking_secrets_start_and_dev_needs_none() -> None:
    settings = PaymentsSettings(
        env="production", jwt_key=JWT, stripe_secret_key=KEY, stripe_webhook_secret=WEBHOOK
    )
    assert not settings.is_dev
    assert PaymentsSettings(env="dev").stripe_webhook_secret == DEV_WEBHOOK_SECRET
