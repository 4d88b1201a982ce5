"""Settings of the expiration service."""

from __future__ import annotations

from ticketing.common.settings import Settings


class ExpirationSettings(Settings):
    # How often the job worker looks for due jobs: the bound on how late an expiry can fire.
    expiration_poll_seconds: float = 0.1

    @property
    def expiration_queue(self) -> str:
        return f"{self.nats_subject_prefix}:expiration"
