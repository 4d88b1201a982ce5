"""Sending email over SMTP (aiosmtplib) to the server named by TICKETING_SMTP_URL."""

from __future__ import annotations

from email.message import EmailMessage
from urllib.parse import unquote, urlsplit

import aiosmtplib

from ticketing.common.errors import ServiceUnavailable


class Mailer:
    """Sends mail to smtp://[user:pass@]host:port (smtps:// for implicit TLS)."""

    def __init__(self, smtp_url: str | None, *, sender: str) -> None:
        self.smtp_url = smtp_url
        self.sender = sender

    async def send(self, *, to: str, subject: str, text: str, html: str | None = None) -> None:
        if not self.smtp_url:
            raise ServiceUnavailable("Email is not configured on this server")
        message = EmailMessage()
        message["From"] = self.sender
        message["To"] = to
        message["Subject"] = subject
        message.set_content(text)
        if html:
            message.add_alternative(html, subtype="html")
        url = urlsplit(self.smtp_url)
        try:
            await aiosmtplib.send(
                message,
                hostname=url.hostname or "localhost",
                port=url.port or (465 if url.scheme == "smtps" else 25),
                username=unquote(url.username) if url.username else None,
                password=unquote(url.password) if url.password else None,
                use_tls=url.scheme == "smtps",
                start_tls=False if url.scheme == "smtp" and not url.username else None,
                timeout=10,
            )
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise ServiceUnavailable("Could not send the email; please try again shortly") from exc
