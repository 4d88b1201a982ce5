"""Settings of the web client."""

from __future__ import annotations

from ticketing.common.settings import Settings


class WebSettings(Settings):
    uses_public_url = True
    # Where the pages reach the APIs (the ingress in production); the public URL by default.
    api_url: str | None = None
    # With a publishable key the pay form uses Stripe's card element; without, the test cards.
    stripe_publishable_key: str | None = None

    @property
    def api_base(self) -> str:
        return (self.api_url or self.public_url).rstrip("/")
