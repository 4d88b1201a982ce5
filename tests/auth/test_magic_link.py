"""Magic links through a real SMTP server (aiosmtpd): request, email, verify, single use, TTL."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from tests.support import eventually
from ticketing.auth.app import create_app
from ticketing.auth.models import MagicLink
from ticketing.auth.service import hash_token
from ticketing.auth.settings import AuthSettings
from ticketing.common.mailbox import read_mailbox
from ticketing.platform.embedded import SmtpSink

LINK = re.compile(r"http://testserver/api/users/verify-magic-link\?token=([A-Za-z0-9_\-]+)")


async def _emailed_token(sink: SmtpSink, to: str) -> str:
    async def mails() -> list[dict[str, Any]]:
        return [m for m in read_mailbox(sink.folder) if to in m["to"]]

    newest = (await eventually(mails))[0]
    match = LINK.search(newest["text"])
    assert match, newest["text"]
    return match.group(1)


async def _requested_token(client: httpx.AsyncClient, sink: SmtpSink, email: str) -> str:
    """Ask for a link for `email`, and read its token from the mail."""
    await client.post("/api/users/magic-link", json={"email": email})
    return await _emailed_token(sink, email)


async def test_request_is_202_and_emails_a_link(
    client: httpx.AsyncClient, smtp_sink: SmtpSink
) -> None:
    response = await client.post("/api/users/magic-link", json={"email": "new@test.com"})
    assert response.status_code == 202
    assert response.json() == {}
    token = await _emailed_token(smtp_sink, "new@test.com")
    assert len(token) >= 32
    mail = read_mailbox(smtp_sink.folder)[0]
    assert mail["subject"] == "Your sign-in link"
    assert "expires in 60 seconds" in mail["text"]


async def test_first_use_signs_up_and_sets_the_cookie(
    client: httpx.AsyncClient, smtp_sink: SmtpSink
) -> None:
    token = await _requested_token(client, smtp_sink, "new@test.com")
    response = await client.get(f"/api/users/verify-magic-link?token={token}")
    assert response.status_code == 303
    assert response.headers["location"] == "/"
    assert "httponly" in response.headers["set-cookie"].lower()
    current = (await client.get("/api/users/currentuser")).json()["currentUser"]
    assert current["email"] == "new@test.com"


async def test_a_known_email_signs_in_to_the_same_account(
    client: httpx.AsyncClient, make_client: Callable[[], httpx.AsyncClient], smtp_sink: SmtpSink
) -> None:
    user = (
        await client.post(
            "/api/users/signup", json={"email": "known@test.com", "password": "secret"}
        )
    ).json()
    async with make_client() as browser:
        token = await _requested_token(browser, smtp_sink, "known@test.com")
        assert (await browser.get(f"/api/users/verify-magic-link?token={token}")).status_code == 303
        current = (await browser.get("/api/users/currentuser")).json()["currentUser"]
    assert current["id"] == user["id"]


async def test_a_link_works_once(client: httpx.AsyncClient, smtp_sink: SmtpSink) -> None:
    token = await _requested_token(client, smtp_sink, "once@test.com")
    assert (await client.get(f"/api/users/verify-magic-link?token={token}")).status_code == 303
    again = await client.get(f"/api/users/verify-magic-link?token={token}")
    assert again.status_code == 400
    assert again.json()["errors"][0]["message"] == "This sign-in link is invalid, used or expired"


async def test_a_head_of_a_link_leaves_it_unspent(
    client: httpx.AsyncClient, smtp_sink: SmtpSink
) -> None:
    """A mail scanner or a link preview that asks with HEAD: no session, the link still works."""
    token = await _requested_token(client, smtp_sink, "scanned@test.com")
    head = await client.head(f"/api/users/verify-magic-link?token={token}")
    assert head.status_code == 200
    assert "set-cookie" not in head.headers
    assert (await client.get(f"/api/users/verify-magic-link?token={token}")).status_code == 303


async def test_bad_or_missing_tokens_are_400(client: httpx.AsyncClient) -> None:
    for url in ("/api/users/verify-magic-link?token=nope", "/api/users/verify-magic-link"):
        response = await client.get(url)
        assert response.status_code == 400
        assert "set-cookie" not in response.headers


async def test_a_browser_opening_a_spent_link_gets_a_page_saying_what_to_do(
    client: httpx.AsyncClient, smtp_sink: SmtpSink
) -> None:
    """Opened from an email, in a browser: still the 400, as a page; other clients, the JSON."""
    token = await _requested_token(client, smtp_sink, "page@test.com")
    url = f"/api/users/verify-magic-link?token={token}"
    assert (await client.get(url)).status_code == 303
    browser = {"accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
    page = await client.get(url, headers=browser)
    assert page.status_code == 400
    assert page.headers["content-type"].startswith("text/html")
    assert "This sign-in link is invalid, used or expired" in page.text
    assert 'href="/auth/signin"' in page.text
    assert "set-cookie" not in page.headers
    assert (await client.get(url)).json()["errors"][0]["field"] == "token"


async def test_a_link_another_site_sends_a_browser_to_asks_first_and_is_kept(
    client: httpx.AsyncClient, smtp_sink: SmtpSink
) -> None:
    """Login CSRF: another site may send a visitor's browser to a link it asked for itself,
    to have them buy into its account. Such a visit is asked whether the address is theirs;
    the link is spent only by the page's own form."""
    token = await _requested_token(client, smtp_sink, "a@test.com")
    link = f"/api/users/verify-magic-link?token={token}"
    navigation = {"accept": "text/html,*/*;q=0.8", "sec-fetch-mode": "navigate"}
    for sent_by in ("cross-site", "same-site"):
        page = await client.get(link, headers={**navigation, "sec-fetch-site": sent_by})
        assert (page.status_code, "set-cookie" in page.headers) == (200, False), sent_by
        assert "Sign in as a@test.com?" in page.text and page.headers["x-frame-options"] == "DENY"
    form = {"token": token}
    forged = await client.post(
        "/api/users/verify-magic-link", data=form, headers={"sec-fetch-site": "cross-site"}
    )
    assert (forged.status_code, "set-cookie" in forged.headers) == (400, False)
    confirmed = await client.post(
        "/api/users/verify-magic-link", data=form, headers={"sec-fetch-site": "same-origin"}
    )
    assert confirmed.status_code == 303 and "session=" in confirmed.headers["set-cookie"]
    assert (await client.post("/api/users/verify-magic-link", data=form)).status_code == 400


@pytest.mark.parametrize("sent_by", ["none", "same-origin", None])
async def test_a_link_typed_opened_from_a_mail_program_or_our_pages_signs_in_at_once(
    client: httpx.AsyncClient, smtp_sink: SmtpSink, sent_by: str | None
) -> None:
    token = await _requested_token(client, smtp_sink, "b@test.com")
    headers = {"accept": "text/html"} | ({"sec-fetch-site": sent_by} if sent_by else {})
    opened = await client.get(f"/api/users/verify-magic-link?token={token}", headers=headers)
    assert opened.status_code == 303 and "session=" in opened.headers["set-cookie"]


async def test_token_is_stored_hashed(
    client: httpx.AsyncClient, auth_app: Any, smtp_sink: SmtpSink
) -> None:
    token = await _requested_token(client, smtp_sink, "hash@test.com")
    async with auth_app.state.runtime.db.transaction() as session:
        stored = list(await session.scalars(select(MagicLink.token_hash)))
    assert stored == [hash_token(token)]
    assert token not in stored


async def test_expired_links_are_deleted_as_new_ones_are_made(auth_app: Any) -> None:
    from ticketing.auth import service

    db = auth_app.state.runtime.db
    async with db.transaction() as session:
        await service.create_magic_link(session, email="old@test.com", ttl_seconds=-1)
        await service.create_magic_link(session, email="kept@test.com", ttl_seconds=60)
    async with db.transaction() as session:
        await service.create_magic_link(session, email="new@test.com", ttl_seconds=60)
        stored = set(await session.scalars(select(MagicLink.email)))
    assert stored == {"kept@test.com", "new@test.com"}


async def test_an_expired_link_is_refused(auth_settings: AuthSettings, smtp_sink: SmtpSink) -> None:
    app = create_app(auth_settings.model_copy(update={"magic_link_ttl_seconds": 0}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            token = await _requested_token(c, smtp_sink, "late@test.com")
            response = await c.get(f"/api/users/verify-magic-link?token={token}")
    assert response.status_code == 400


async def test_invalid_email_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/users/magic-link", json={"email": "nope"})
    assert response.status_code == 400
    assert response.json() == {"errors": [{"message": "Email must be valid", "field": "email"}]}


async def test_requests_are_rate_limited_per_email(
    auth_settings: AuthSettings, smtp_sink: SmtpSink
) -> None:
    app = create_app(auth_settings.model_copy(update={"magic_link_limit_per_email": 2}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            codes = [
                (await c.post("/api/users/magic-link", json={"email": "spam@test.com"})).status_code
                for _ in range(3)
            ]
    assert codes == [202, 202, 429]


async def test_smtp_down_is_503_not_500(auth_settings: AuthSettings, tmp_path: Path) -> None:
    from ticketing.platform.embedded import free_port

    app = create_app(
        auth_settings.model_copy(update={"smtp_url": f"smtp://127.0.0.1:{free_port()}"})
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            response = await c.post("/api/users/magic-link", json={"email": "x@test.com"})
    assert response.status_code == 503
    assert response.json()["errors"][0]["message"].startswith("Could not send the email")
