"""A cap on request bodies: a client cannot make a service hold more than this in memory."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ticketing.common.errors import error_body, error_response

# Nothing any route takes comes near it (the largest is a Stripe webhook, a few kilobytes); the
# Kubernetes ingress caps bodies at 1 MiB as well.
MAX_BODY_BYTES = 1024 * 1024
TOO_LARGE_MESSAGE = "Request body too large"
TOO_LARGE = error_body(TOO_LARGE_MESSAGE)


class BodyLimit:
    """413 for a body over the cap: at once when its Content-Length says so, else as soon as
    the bytes received pass it (the app is then told the client went away, and whatever it
    makes of that is replaced by the 413)."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _declared_length(scope) > self.limit:
            await _too_large(scope, receive, send)
            return
        received, over, started = 0, False, False

        async def counted() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            if over and not started:
                return  # the app's answer to a "disconnect": the 413 goes instead
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except Exception:
            if not over:
                raise
        if over and not started:
            await _too_large(scope, receive, send)


def _declared_length(scope: Scope) -> int:
    for key, value in scope["headers"]:
        if key == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0


async def _too_large(scope: Scope, receive: Receive, send: Send) -> None:
    response = error_response(413, TOO_LARGE_MESSAGE)
    response.headers["connection"] = "close"  # the rest of the body is not read
    await response(scope, receive, send)
