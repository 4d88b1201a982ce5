"""HEAD on any GET route, as HTTP asks of every server (monitors and link checkers use it)."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


class HeadAsGet:
    """Route a HEAD as the GET of the same path. The headers are the GET's; the server sends
    no body (uvicorn drops it for a HEAD, by its own scope, which this leaves as it is)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)
