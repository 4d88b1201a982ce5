"""Routing by path through one port, as the Kubernetes ingress routes."""

from __future__ import annotations

from typing import Any

from tests.conftest import Platform

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
        page = await browser.get("/nowhere")
        assert page.status_code == 404
        assert page.headers["content-type"].startswith("text/html")
        json_please = await browser.get("/nowhere", headers={"accept": "application/json"})
        assert (json_please.status_code, json_please.json()) == (404, NOT_FOUND)
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
