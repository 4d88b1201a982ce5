"""Settings of the auth service."""

from __future__ import annotations

from ticketing.common.settings import Settings


class AuthSettings(Settings):
    uses_public_url = True
    smtp_url: str | None = None
    mail_from: str = "Ticketing <no-reply@ticketing.local>"
    magic_link_ttl_seconds: int = 60
    rate_limit_window_seconds: int = 60
    signin_limit_per_client: int = 300
    signin_limit_per_email: int = 10
    magic_link_limit_per_client: int = 60
    magic_link_limit_per_email: int = 5
    # Refused sign-ups only (a sign-up made is not counted).
    signup_limit_per_client: int = 30
    signup_limit_per_email: int = 10
