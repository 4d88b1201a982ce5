"""Settings of the expiration service."""

from __future__ import annotations

from ticketing.common.settings import Settings


class ExpirationSettings(Settings):
    # How often the job worker looks for due jobs (a job is due START_AHEAD before its order's
    # expiry, so this bounds how late a job starts, not how late the expiry fires).
    expiration_poll_seconds: float = 0.1
    # Jobs at once. A job starts ahead of its order's expiry and waits (holding nothing but a
    # slot), so this bounds how many orders can expire on time within that lead: the orders
    # of a rush expire together. Its one statement takes a pooled connection only briefly.
    expiration_max_jobs: int = 1000

    @property
    def expiration_queue(self) -> str:
        return f"{self.nats_subject_prefix}:expiration"
