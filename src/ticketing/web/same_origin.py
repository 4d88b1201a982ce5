"""The site's forms take posts from its own pages only.

The session cookie is SameSite=Lax, so another site's form cannot post with the visitor's
session; it can still post a sign-in or a sign-up with credentials of its own choosing and
leave the visitor signed in as someone else (login CSRF). A browser says where a post comes
from: `Sec-Fetch-Site`, or else `Origin`. A post that says it comes from another site is
refused; one that says nothing (not a browser) goes on."""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

REFUSED = "This form can only be sent from this site's own pages."


class SameOriginPosts:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and from_another_site(scope):
            await PlainTextResponse(REFUSED, status_code=403)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def from_another_site(scope: Scope) -> bool:
    """What the browser says of a request's origin: another site's page (a form, a link, an
    image). A request that says nothing (typed, bookmarked, not a browser) is not."""
    headers: dict[bytes, str] = {k: v.decode("latin-1") for k, v in scope["headers"]}
    fetch_site = headers.get(b"sec-fetch-site")
    if fetch_site is not None:
        return fetch_site not in ("same-origin", "none")  # none: typed or bookmarked by the user
    origin = headers.get(b"origin")
    if origin is None:
        return False
    return origin == "null" or urlsplit(origin).netloc != headers.get(b"host", "")
