"""The web client's app factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from ticketing.common.body_limit import BodyLimit
from ticketing.common.errors import http_error_response
from ticketing.common.head import HeadAsGet
from ticketing.common.metrics import ServiceMetrics, install_http_metrics
from ticketing.common.openapi import install_contract_openapi
from ticketing.common.same_origin import NoFraming, SameOriginPosts
from ticketing.web.client import ApiUnavailable
from ticketing.web.routes import router
from ticketing.web.settings import WebSettings

HERE = Path(__file__).parent


def _keeps_no_cookies() -> CookieJar:
    """The API client serves every visitor at once: a cookie an answer sets (the session, on a
    sign-in) is handed to that visitor's browser and must not stay in the client, which would
    send it along with the calls of every visitor who has none."""
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


def create_app(settings: WebSettings | None = None) -> FastAPI:
    settings = settings or WebSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with httpx.AsyncClient(
            base_url=settings.api_base, timeout=15, cookies=_keeps_no_cookies()
        ) as http:
            app.state.http = http
            yield

    app = FastAPI(title="ticketing web", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_contract_openapi(app)
    app.state.settings = settings
    app.state.templates = Jinja2Templates(directory=HERE / "templates")
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(router)
    metrics = app.state.metrics = ServiceMetrics("web")
    app.add_middleware(HeadAsGet)  # innermost, as in every service
    app.add_middleware(SameOriginPosts, public_url=settings.public_url)
    app.add_middleware(NoFraming)
    app.add_middleware(BodyLimit)
    install_http_metrics(app, metrics)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        # The web client owns nothing: it is ready once its client for the APIs exists.
        ready = hasattr(app.state, "http")
        body = {"status": "ok" if ready else "unavailable"}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return metrics.render()

    @app.exception_handler(ApiUnavailable)
    async def _unavailable(request: Request, _exc: Exception) -> HTMLResponse:
        message = "The service is not answering right now; please try again shortly."
        return _page(app, request, 503, "Temporarily unavailable", message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, StarletteHTTPException) else 500
        path = request.url.path
        api_path = path == "/api" or path.startswith("/api/")
        if isinstance(exc, StarletteHTTPException) and (api_path or _wants_json(request)):
            # Under /api no service took the path (the ingress sends the rest here), or the
            # client asked for JSON: an API client gets the API's error body, not a page.
            return http_error_response(exc)
        if status == 404:
            return _page(app, request, 404, "Page not found", "There is nothing here.")
        return _page(app, request, status, "Error", "Something went wrong.")

    return app


def _wants_json(request: Request) -> bool:
    """Whether the client is no browser showing pages: a browser's navigation asks for
    text/html, and htmx (whose requests accept anything) says who it is; curl and API
    clients get the API's error body."""
    accept = request.headers.get("accept", "")
    return "text/html" not in accept and "hx-request" not in request.headers


def _page(app: FastAPI, request: Request, status: int, title: str, message: str) -> HTMLResponse:
    context = {"user": None, "dev": app.state.settings.is_dev, "title": title, "message": message}
    templates: Jinja2Templates = app.state.templates
    return templates.TemplateResponse(request, "error.html", context, status_code=status)
