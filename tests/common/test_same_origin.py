"""Which posts the site's forms take: those a browser says come from the site's own pages."""

from __future__ import annotations

import pytest

from ticketing.common.same_origin import from_another_site

PROXIED = {"x_forwarded_host": "tickets.example"}


def scope(**headers: str) -> dict[str, object]:
    encoded = [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return {"type": "http", "method": "POST", "headers": encoded}


@pytest.mark.parametrize(
    ("headers", "foreign"),
    [
        ({"sec_fetch_site": "cross-site"}, True),
        ({"sec_fetch_site": "same-site"}, True),  # another host under the same domain
        ({"sec_fetch_site": "same-origin"}, False),
        ({"sec_fetch_site": "none"}, False),  # typed or bookmarked
        ({}, False),  # not a browser
        ({"origin": "https://elsewhere.example", "host": "tickets.example"}, True),
        ({"origin": "null", "host": "tickets.example"}, True),
        ({"origin": "http://tickets.example:8000", "host": "tickets.example:8000"}, False),
        # Default ports, and case, are not a difference.
        ({"origin": "http://Tickets.Example", "host": "tickets.example:80"}, False),
        ({"origin": "https://tickets.example", "host": "TICKETS.example:443"}, False),
        # A proxy that rewrote Host says what the browser asked for.
        ({"origin": "https://tickets.example", "host": "web:8000", **PROXIED}, False),
        ({"origin": "https://elsewhere.example", "host": "web:8000", **PROXIED}, True),
    ],
)
def test_a_post_is_foreign_when_the_browser_says_it_comes_from_another_site(
    headers: dict[str, str], foreign: bool
) -> None:
    assert from_another_site(scope(**headers)) is foreign


def test_the_public_address_is_the_sites_own_whatever_host_the_proxy_sends() -> None:
    behind = scope(origin="https://tickets.example", host="10.0.0.5:8000")
    assert from_another_site(behind)
    assert not from_another_site(behind, also_ours="tickets.example")
