"""The site's forms take posts from its own pages only.

The session cookie is SameSite=Lax, so another site's form cannot post with the visitor's
session; it can still post a sign-in or a sign-up with credentials of its own choosing and
leave the visitor signed in as someone else (login CSRF). A browser says where a post comes
from: `Sec-Fetch-Site`, or else `Origin`. A post that says it comes from another site is
refused; one that says nothing (not a browser) goes on."""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REFUSED = "This form can only be sent from this site's own pages."


class SameOriginPosts:
    def __init__(self, app: ASGIApp, public_url: str = "") -> None:
        self.app = app
        self.public = urlsplit(public_url).netloc if public_url else ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        posted = scope["type"] == "http" and scope["method"] == "POST"
        if posted and from_another_site(scope, also_ours=self.public):
            await PlainTextResponse(REFUSED, status_code=403)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def from_another_site(scope: Scope, *, also_ours: str = "") -> bool:
    """What the browser says of a request's origin: another site's page (a form, a link, an
    image). A request that says nothing (typed, bookmarked, not a browser) is not. Without
    Sec-Fetch-Site (plain http away from localhost), Origin is compared with the addresses the
    site goes by: the Host header, a proxy's X-Forwarded-Host, and `also_ours` (the public
    address), default ports and case aside."""
    headers: dict[bytes, str] = {k: v.decode("latin-1") for k, v in scope["headers"]}
    fetch_site = headers.get(b"sec-fetch-site")
    if fetch_site is not None:
        return fetch_site not in ("same-origin", "none")  # none: typed or bookmarked by the user
    origin = headers.get(b"origin")
    if origin is None:
        return False
    if origin == "null":
        return True
    parts = urlsplit(origin)
    forwarded = headers.get(b"x-forwarded-host", "").split(",")[0].strip()
    ours = {_authority(parts.scheme, a) for a in (headers.get(b"host", ""), forwarded, also_ours)}
    return _authority(parts.scheme, parts.netloc) not in ours - {""}


def _authority(scheme: str, netloc: str) -> str:
    """host[:port] as compared: lower case, without the scheme's default port."""
    netloc = netloc.strip().lower()
    default = {"http": ":80", "https": ":443"}.get(scheme.lower(), "")
    return netloc.removesuffix(default) if default else netloc


NO_FRAMING_HEADERS = {
    "x-frame-options": "DENY",
    "content-security-policy": "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
}
_NO_FRAMING = [(k.encode(), v.encode()) for k, v in NO_FRAMING_HEADERS.items()]


class NoFraming:
    """No page of the site may be shown in another site's frame, where a visitor could be
    made to click Purchase, Pay or Sign out unseen (clickjacking)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_framed(message: Message) -> None:
            if message["type"] == "http.response.start":
                given = {name for name, _ in message.get("headers", ())}
                extra = [(k, v) for k, v in _NO_FRAMING if k not in given]
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await self.app(scope, receive, send_framed)
