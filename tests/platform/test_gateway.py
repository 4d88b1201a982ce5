"""Routing by path through one port, as the Kubernetes ingress routes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Platform, payments_settings
from tests.support import eventually
from ticketing.platform.embedded import EmbeddedRedis, listening_socket
from ticketing.platform.gateway import KEEP_ALIVE_SECONDS, server_config, until_started
from ticketing.platform.services import SERVICES
from ticketing.platform.stripe_sandbox import SandboxServer

UVICORN_KEEP_ALIVE_SECONDS = 5  # uvicorn's own default
NOT_FOUND = {"errors": [{"message": "Not found", "field": None}]}


async def test_an_api_path_no_service_serves_answers_in_the_api_error_shape(
    platform: Platform,
) -> None:
    """The web client takes every path no service claims; under /api it answers as an API."""
    await platform.start("web", "tickets")
    async with platform.client() as browser:
        for path in ("/api", "/api/nonexistent", "/api/ticketsX", "/api/userz/1"):
            answer = await browser.get(path)
            assert (answer.status_code, answer.json()) == (404, NOT_FOUND), path
        assert (await browser.get("/api/tickets")).status_code == 200  # a service's own
        navigation = {"accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
        for headers in (navigation, {"hx-request": "true"}):
            page = await browser.get("/nowhere", headers=headers)
            assert page.status_code == 404
            assert page.headers["content-type"].startswith("text/html"), headers
        for accept in ("*/*", "application/json"):  # curl and httpx, an API client
            answer = await browser.get("/nowhere", headers={"accept": accept})
            assert (answer.status_code, answer.json()) == (404, NOT_FOUND), accept
        wrong_method = await browser.delete("/", headers={"accept": "application/json"})
        assert wrong_method.status_code == 405
        assert list(wrong_method.json()) == ["errors"]


async def test_no_service_documents_a_422(settings_kwargs: dict[str, Any]) -> None:
    """Validation is a 400 everywhere (the contract), and so the documents say."""
    from ticketing.platform.services import SERVICES

    stripe = {"stripe_secret_key": "sk_test_sandbox", "stripe_api_base": "http://127.0.0.1:9"}
    for name, spec in SERVICES.items():
        app = spec.create_app(**settings_kwargs, **stripe)  # built, not started: no part needed
        document = app.openapi()
        assert "422" not in str(document["paths"]), name
        assert "ErrorBody" in document["components"]["schemas"], name


PREFIXED = ("auth", "tickets", "orders", "payments")


async def test_each_service_answers_for_itself_under_its_prefix(
    platform: Platform, sandbox: SandboxServer
) -> None:
    """Through the gateway, as through the ingress, a service's health, readiness, metrics
    and documents are under its prefix; an id-shaped route of its own does not take them."""
    await platform.start("web", "auth", "tickets", "orders")
    await platform.start("payments", **payments_settings(sandbox))
    async with platform.client() as visitor:
        for name in PREFIXED:
            prefix = SERVICES[name].prefix
            assert (await visitor.get(f"{prefix}/healthz")).json() == {"status": "ok"}, name
            ready = await visitor.get(f"{prefix}/readyz")
            assert (ready.status_code, ready.json()["database"]) == (200, "ok"), name
            metrics = (await visitor.get(f"{prefix}/metrics")).text
            names = {family.name for family in text_string_to_metric_families(metrics)}
            assert "ticketing_http_requests" in names, name
            document = (await visitor.get(f"{prefix}/openapi.json")).json()
            assert any(path.startswith(f"{prefix}") for path in document["paths"]), name
            docs = await visitor.get(f"{prefix}/docs")
            assert f"{prefix}/openapi.json" in docs.text, name


async def test_the_root_reports_for_every_service_in_the_process(
    platform: Platform, sandbox: SandboxServer, tmp_path: Any
) -> None:
    """`ticketing up`'s /readyz is every service's readiness (503 while one is not ready,
    saying which part) and its /metrics every service's, labelled by service."""
    redis_server = EmbeddedRedis(tmp_path / "valkey")
    redis_server.start()
    try:
        await platform.start("web", "tickets")
        await platform.start("expiration", redis_url=redis_server.url)
        async with platform.client() as visitor:
            ready = await visitor.get("/readyz")
            assert ready.status_code == 200, ready.json()
            assert ready.json()["database"] == ready.json()["redis"] == "ok"
            assert set(ready.json()["services"]) == {"web", "tickets", "expiration"}
            await visitor.get("/api/tickets")
            metrics = (await visitor.get("/metrics")).text
            redis_server.stop()

            async def not_ready() -> Any:
                answer = await visitor.get("/readyz")
                return answer if answer.status_code == 503 else None

            down = (await eventually(not_ready)).json()
            # A monitor asking with HEAD hears the same (not the web client's page).
            assert (await visitor.head("/readyz")).status_code == 503
    finally:
        redis_server.stop()
    assert (down["status"], down["redis"], down["database"]) == ("unavailable", "down", "ok")
    assert down["services"]["expiration"]["redis"] == "down"
    assert down["services"]["tickets"]["status"] == "ok"
    served = [
        sample
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "ticketing_http_requests_total"
    ]
    assert {"service": "tickets", "method": "GET", "route": "/api/tickets", "status": "200"} in [
        sample.labels for sample in served
    ]


async def test_the_documents_list_the_errors_each_route_answers(
    settings_kwargs: dict[str, Any],
) -> None:
    stripe = {"stripe_secret_key": "sk_test_sandbox", "stripe_api_base": "http://127.0.0.1:9"}
    paths: dict[str, Any] = {}
    for name in PREFIXED:
        paths.update(SERVICES[name].create_app(**settings_kwargs, **stripe).openapi()["paths"])

    def documented(path: str, method: str) -> set[str]:
        return set(paths[path][method]["responses"])

    # A malformed id in a path is a 404, so a route whose only input is that id has no 400.
    assert documented("/api/tickets/{ticket_id}", "get") == {"200", "404", "503"}
    assert documented("/api/tickets/{ticket_id}", "put") == {
        "200", "400", "401", "404", "409", "413", "503"
    }  # fmt: skip
    assert documented("/api/orders", "post") == {"201", "400", "401", "404", "413", "503"}
    assert documented("/api/orders/{order_id}", "delete") == {"204", "400", "401", "404", "503"}
    assert documented("/api/payments", "post") >= {"201", "400", "401", "402", "404"}
    assert documented("/api/users/signin", "post") >= {"200", "400", "429"}
    assert documented("/api/users/verify-magic-link", "get") >= {"303", "400"}
    assert all(
        "503" in operation["responses"] for ops in paths.values() for operation in ops.values()
    )


async def test_no_page_of_the_site_may_be_framed_by_another(platform: Platform) -> None:
    """Clickjacking: Purchase, Pay and Sign out must not be clickable inside another site's
    frame; every answer of the web client says so, its error pages too."""
    await platform.start("web", "tickets")
    async with platform.client() as browser:
        for path in ("/", "/auth/signin", "/nowhere"):
            page = await browser.get(path, headers={"accept": "text/html"})
            assert page.headers["x-frame-options"] == "DENY", path
            assert page.headers["content-security-policy"] == "frame-ancestors 'none'", path
            assert page.headers["x-content-type-options"] == "nosniff", path


class _Server(uvicorn.Server):
    """The real server, leaving the signals to pytest."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _answer(scope: Any, receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
    await writer.drain()
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)


async def test_a_server_keeps_an_idle_connection_longer_than_what_sits_in_front() -> None:
    """A connection idle for longer than uvicorn's own 5 s still serves the next request: the
    server does not close it just as a client (or ingress-nginx, 60 s) sends on it."""
    assert server_config(_answer, "warning").timeout_keep_alive == KEEP_ALIVE_SECONDS > 60
    with listening_socket("127.0.0.1", 0) as sock:
        server = _Server(server_config(_answer, "warning"))
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            assert await until_started(server, serving)
            reader, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            assert (await _exchange(reader, writer)).startswith(b"HTTP/1.1 204")
            await asyncio.sleep(UVICORN_KEEP_ALIVE_SECONDS + 1)  # idle: the stimulus itself
            assert (await _exchange(reader, writer)).startswith(b"HTTP/1.1 204")
            writer.close()
        finally:
            server.should_exit = True
            await serving
