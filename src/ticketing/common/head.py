"""HEAD on any GET route, as HTTP asks of every server (monitors and link checkers use it)."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

_HEAD = "ticketing.head"


class HeadAsGet:
    """Route a HEAD as the GET of the same path. The headers are the GET's; the server sends
    no body (uvicorn drops it for a HEAD, by its own scope, which this leaves as it is). A GET
    that acts (a magic link spent, a sign-out) must not act for a HEAD: `is_head` tells."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        inner = {**scope, "method": "GET", _HEAD: True}
        await self.app(inner, receive, send)
        if "route" in inner:  # for the metrics outside, which label a request by its route
            scope["route"] = inner["route"]


def is_head(scope: Scope) -> bool:
    """Whether a GET is really a HEAD (a link checker, a preview, a monitor): nothing to do."""
    return bool(scope.get(_HEAD))
