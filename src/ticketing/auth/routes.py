"""HTTP routes of the auth service: a thin adapter over service.py."""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy.ext.asyncio import AsyncSession

from ticketing.auth import service
from ticketing.auth.mail import Mailer
from ticketing.auth.schemas import (
    CurrentUserOut,
    MagicLinkBody,
    SigninBody,
    SignupBody,
    UserOut,
)
from ticketing.auth.settings import AuthSettings
from ticketing.common.app import RuntimeDep, SessionDep
from ticketing.common.auth import CurrentUser, clear_session_cookie, sign_in
from ticketing.common.errors import BadRequest, TooManyRequests
from ticketing.common.head import is_head
from ticketing.common.openapi import error_responses
from ticketing.common.same_origin import NO_FRAMING_HEADERS, REFUSED, from_another_site

router = APIRouter(prefix="/api/users", tags=["auth"])


async def _settings(request: Request) -> AuthSettings:
    settings: AuthSettings = request.app.state.settings
    return settings


async def _mailer(request: Request) -> Mailer:
    mailer: Mailer = request.app.state.mailer
    return mailer


SettingsDep = Annotated[AuthSettings, Depends(_settings)]
MailerDep = Annotated[Mailer, Depends(_mailer)]


# How many times its per-email limit an email may be tried from every client together.
EVERY_CLIENT_FACTOR = 10


@dataclass(frozen=True)
class Counted:
    """The keys an attempt was counted against, and in which window."""

    keys: list[str]
    window: int


async def _rate_limit(
    runtime: RuntimeDep,
    request: Request,
    *,
    action: str,
    email: str,
    per_client: int,
    per_email: int,
) -> Counted:
    """Count the attempt against the client, the email from that client and the email from
    every client; 429 when any is over its limit."""
    settings: AuthSettings = request.app.state.settings
    client = request.client.host if request.client else "unknown"
    limits = {
        f"{action}:client:{client}": per_client,
        # Per email from one client: the tight limit on guesses is not a way for anyone to
        # keep its owner out (ten wrong passwords a minute, sent by someone else, did).
        f"{action}:from:{client}:{email}": per_email,
        # Per email from anywhere, looser: guesses spread over many clients still stop.
        f"{action}:email:{email}": per_email * EVERY_CLIENT_FACTOR,
    }
    window = service.current_window(settings.rate_limit_window_seconds)
    # Its own transaction: the count must stick even when the attempt itself fails.
    async with runtime.db.transaction() as session:
        over = await service.over_limit(session, limits=limits, window=window)
    if over:
        raise TooManyRequests(
            "Too many attempts; please wait a minute and try again",
            retry_after_seconds=service.seconds_left(window, settings.rate_limit_window_seconds),
        )
    return Counted(list(limits), window)


@router.post("/signup", status_code=201, responses=error_responses(429))
async def signup(
    body: SignupBody,
    request: Request,
    runtime: RuntimeDep,
    session: SessionDep,
    settings: SettingsDep,
    response: Response,
) -> UserOut:
    # Only refusals count ('Email in use' tells whether an address has an account: asked
    # about address after address, a list of who is a customer); a sign-up made is refunded.
    counted = await _rate_limit(
        runtime, request, action="signup", email=body.email,
        per_client=settings.signup_limit_per_client, per_email=settings.signup_limit_per_email,
    )  # fmt: skip
    user = await service.signup(session, email=body.email, password=body.password)
    await service.uncount_attempt(session, keys=counted.keys, window=counted.window)
    sign_in(response, settings, user_id=user.id, email=user.email)
    return UserOut(id=user.id, email=user.email)


@router.post("/signin", responses=error_responses(429))
async def signin(
    body: SigninBody,
    request: Request,
    runtime: RuntimeDep,
    session: SessionDep,
    settings: SettingsDep,
    response: Response,
) -> UserOut:
    counted = await _rate_limit(
        runtime, request, action="signin", email=body.email,
        per_client=settings.signin_limit_per_client, per_email=settings.signin_limit_per_email,
    )  # fmt: skip
    user = await service.signin(session, email=body.email, password=body.password)
    # Counted first, so that guesses sent at once are all counted; one that signs in was no
    # guess, and someone who signs in often is not locked out for it.
    await service.uncount_attempt(session, keys=counted.keys, window=counted.window)
    sign_in(response, settings, user_id=user.id, email=user.email)
    return UserOut(id=user.id, email=user.email)


@router.post("/signout")
async def signout(settings: SettingsDep, response: Response) -> dict[str, str]:
    clear_session_cookie(response, settings)
    return {}


@router.get("/currentuser")
async def currentuser(user: CurrentUser) -> CurrentUserOut:
    return CurrentUserOut.model_validate({"currentUser": user.model_dump() if user else None})


@router.post("/magic-link", status_code=202, responses=error_responses(429))
async def request_magic_link(
    body: MagicLinkBody,
    request: Request,
    runtime: RuntimeDep,
    settings: SettingsDep,
    mailer: MailerDep,
) -> dict[str, str]:
    await _rate_limit(
        runtime, request, action="magic", email=body.email,
        per_client=settings.magic_link_limit_per_client,
        per_email=settings.magic_link_limit_per_email,
    )  # fmt: skip
    async with runtime.db.transaction() as session:
        token = await service.create_magic_link(
            session, email=body.email, ttl_seconds=settings.magic_link_ttl_seconds
        )
    link = f"{settings.public_url.rstrip('/')}/api/users/verify-magic-link?token={token}"
    await mailer.send(
        to=body.email,
        subject="Your sign-in link",
        text=f"Sign in to Ticketing with this link:\n\n{link}\n\n"
        f"It works once and expires in {settings.magic_link_ttl_seconds} seconds.\n"
        "If you did not ask for it, ignore this email.",
        html=f'<p><a href="{link}">Sign in to Ticketing</a></p>'
        f"<p>The link works once and expires in {settings.magic_link_ttl_seconds} seconds. "
        "If you did not ask for it, ignore this email.</p>",
    )
    return {}


# What a browser shows for a link that no longer works: it was opened from an email, so a page
# that says what to do, not the contract's JSON (which every other client still gets).
_SPENT_LINK_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>Sign-in link</title><meta name="viewport" content="width=device-width, initial-scale=1">
</head><body style="font-family: system-ui, sans-serif; max-width: 32rem; margin: 4rem auto">
<h1>This sign-in link no longer works</h1><p>{message}. A link works once, for a short while.</p>
<p><a href="/auth/signin">Ask for a new one</a></p></body></html>"""


# Shown instead of signing in when another site sent the browser to a link: whoever made it
# come may have asked for the link for an account of their own (login CSRF: the visitor would
# then buy into the attacker's account). The link is not spent until the visitor says so.
_CONFIRM_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>Sign in</title><meta name="viewport" content="width=device-width, initial-scale=1">
</head><body style="font-family: system-ui, sans-serif; max-width: 32rem; margin: 4rem auto">
<h1>Sign in as {email}?</h1><p>Only go on if you just asked for a sign-in link for this
address; if you did not, close this page.</p>
<form method="post" action="/api/users/verify-magic-link"><input type="hidden" name="token"
value="{token}"><button type="submit">Sign in as {email}</button></form></body></html>"""


def _from_another_site(request: Request, settings: AuthSettings) -> bool:
    """A browser brought here by another site's page (a webmail's link, a form, a script);
    not one that says nothing of it (typed or pasted, a mail program, any other client)."""
    return from_another_site(request.scope, also_ours=urlsplit(settings.public_url).netloc)


@router.get(
    "/verify-magic-link",
    response_model=None,
    status_code=303,
    responses={303: {"description": "Signed in: the session cookie is set, on to /"}},
)
async def verify_magic_link(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    token: Annotated[str | None, Query()] = None,
) -> Response:
    # A HEAD (a mail scanner's, a preview's) is asked first too: it must not spend the link.
    if token and (_from_another_site(request, settings) or is_head(request.scope)):
        email = await service.magic_link_email(session, token=token)
        if email is not None:
            page = _CONFIRM_PAGE.format(email=html.escape(email), token=html.escape(token))
            return HTMLResponse(page, headers=NO_FRAMING_HEADERS)
    return await _spend(request, session, settings, token)


@router.post("/verify-magic-link", include_in_schema=False)
async def confirm_magic_link(
    request: Request, session: SessionDep, settings: SettingsDep
) -> Response:
    """The confirmation page's form: from this site's own page only."""
    if _from_another_site(request, settings):
        raise BadRequest(REFUSED)
    token = (await request.form()).get("token")
    return await _spend(request, session, settings, token if isinstance(token, str) else None)


async def _spend(
    request: Request, session: AsyncSession, settings: AuthSettings, token: str | None
) -> Response:
    try:
        if not token:
            raise BadRequest("This sign-in link is invalid, used or expired", field="token")
        user = await service.use_magic_link(session, token=token)
    except BadRequest as refused:
        if "text/html" not in request.headers.get("accept", ""):
            raise
        return HTMLResponse(_SPENT_LINK_PAGE.format(message=refused.message), status_code=400)
    response = RedirectResponse("/", status_code=303)
    sign_in(response, settings, user_id=user.id, email=user.email)
    return response
