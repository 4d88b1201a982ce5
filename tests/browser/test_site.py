"""The site in a real browser (the system Chromium, driven by Playwright) against a real
`ticketing up` on embedded defaults. Every page visited is saved as a screenshot."""

from __future__ import annotations

import asyncio
import re
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from tests.support import Running, clean_env, wait_up

TTL = 12  # long enough to pay by hand in a test, short enough to watch an order expire
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
LAUNCH_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One `ticketing up` for the module, as a visitor would start it."""
    tmp = tmp_path_factory.mktemp("site")
    env = clean_env(TICKETING_DATA_DIR=str(tmp / "data"), TICKETING_ORDER_TTL_SECONDS=str(TTL))
    proc = Running(["up", "--port", "0"], env, tmp / "up.log")
    try:
        yield asyncio.run(wait_up(proc))
    finally:
        proc.interrupt()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield chromium
        await chromium.close()


Shot = Callable[[Page, str], Any]


@pytest.fixture
def shot(request: pytest.FixtureRequest) -> Shot:
    """Save a screenshot of the page under artifacts/screenshots/<test>-<n>-<name>.png."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    counter = iter(range(1, 1000))

    async def take(page: Page, name: str) -> None:
        path = ARTIFACTS / f"{request.node.name}-{next(counter):02d}-{name}.png"
        await page.screenshot(path=str(path), full_page=True)

    return take


async def new_page(browser: Browser, site: str, *, mobile: bool = False) -> Page:
    viewport = {"width": 390, "height": 844} if mobile else {"width": 1280, "height": 800}
    context = await browser.new_context(base_url=site, viewport=viewport)  # type: ignore[arg-type]
    return await context.new_page()


def email() -> str:
    return f"{uuid.uuid4().hex[:10]}@example.com"


async def sign_up(page: Page, shot: Shot, address: str) -> None:
    await page.goto("/auth/signup")
    await shot(page, "signup")
    await page.get_by_label("Email").fill(address)
    await page.get_by_label("Password").fill("secret-pass")
    await page.get_by_role("button", name="Sign up").click()
    await expect(page.get_by_text(address)).to_be_visible()


async def sell(page: Page, shot: Shot, title: str, price: str) -> str:
    await page.get_by_role("link", name="Sell a ticket").click()
    await expect(page.get_by_role("heading", name="Sell a ticket")).to_be_visible()
    await shot(page, "sell")
    await page.get_by_label("Title").fill(title)
    await page.get_by_label("Price").fill(price)
    await page.get_by_role("button", name="Sell ticket").click()
    await expect(page.get_by_role("heading", name=title)).to_be_visible()
    await shot(page, "ticket-seller-view")
    return page.url


async def purchase(page: Page, shot: Shot, ticket_url: str) -> None:
    """Buy a ticket; right after it is listed the orders service may need a moment."""
    await page.goto(ticket_url)
    await shot(page, "ticket-buyer-view")
    for _ in range(20):
        # A form post always navigates: wait for it, whatever page it lands on.
        async with page.expect_navigation():
            await page.get_by_role("button", name="Purchase").click()
        if "/orders/" in page.url:
            break
        await expect(page.get_by_text("catching up; please try again")).to_be_visible()
    await expect(page.get_by_text(re.compile(r"\d+ seconds left"))).to_be_visible()
    await shot(page, "order")


async def pay_with(page: Page, card: str) -> None:
    """Pay with a test card; right after ordering, payments may need a moment to know it."""
    for _ in range(20):
        await page.get_by_label("Card").select_option(card)
        async with page.expect_navigation():
            await page.get_by_role("button", name="Pay").click()
        if not await page.get_by_text("catching up; please try again").is_visible():
            return
    raise AssertionError("the order never became payable")


async def sign_out(page: Page) -> None:
    """/auth/signout typed in: signs out at once (from another site's link, it asks first)."""
    await page.goto("/auth/signout")
    await expect(page.get_by_role("link", name="Sign in")).to_be_visible()


async def test_sell_sign_out_buy_and_pay(browser: Browser, site: str, shot: Shot) -> None:
    page = await new_page(browser, site)
    await page.goto("/")
    await shot(page, "home")
    await sign_up(page, shot, email())
    ticket_url = await sell(page, shot, "Arctic Monkeys, row 12", "85.50")
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_role("link", name="Sign in")).to_be_visible()

    await sign_up(page, shot, email())
    await page.goto("/")
    await expect(page.get_by_role("link", name=re.compile("Arctic Monkeys"))).to_be_visible()
    await shot(page, "home-with-ticket")
    await purchase(page, shot, ticket_url)
    await pay_with(page, "tok_visa")
    await expect(page.get_by_text("Status: complete")).to_be_visible(timeout=15_000)
    await expect(page.get_by_role("button", name="Pay")).to_have_count(0)
    await shot(page, "order-complete")
    await page.get_by_role("link", name="My orders").click()
    await expect(page.get_by_role("cell", name="Arctic Monkeys, row 12")).to_be_visible()
    await expect(page.get_by_role("cell", name="complete")).to_be_visible()
    await shot(page, "my-orders")


async def someone_ordered(
    browser: Browser, site: str, shot: Shot, title: str, price: str, *, mobile: bool = False
) -> Page:
    """A seller lists a ticket and signs out; a new buyer orders it: the buyer's order page."""
    page = await new_page(browser, site, mobile=mobile)
    await sign_up(page, shot, email())
    ticket_url = await sell(page, shot, title, price)
    await sign_out(page)
    await sign_up(page, shot, email())
    await purchase(page, shot, ticket_url)
    return page


async def test_a_declined_card_shows_the_decline(browser: Browser, site: str, shot: Shot) -> None:
    page = await someone_ordered(browser, site, shot, "Cup final", "40", mobile=True)
    await pay_with(page, "tok_chargeDeclined")
    await expect(page.get_by_text("Your card was declined.")).to_be_visible()
    await shot(page, "declined")


async def test_an_unpaid_order_expires(browser: Browser, site: str, shot: Shot) -> None:
    page = await someone_ordered(browser, site, shot, "Jazz night", "25")
    await expect(page.get_by_text("Order expired")).to_be_visible(timeout=(TTL + 5) * 1000)
    await expect(page.get_by_role("button", name="Pay")).to_have_count(0)
    await expect(page.get_by_text("Status: cancelled")).to_be_visible(timeout=10_000)
    await shot(page, "expired")


async def test_a_buyer_who_changes_their_mind_cancels_and_the_ticket_is_back(
    browser: Browser, site: str, shot: Shot
) -> None:
    page = await someone_ordered(browser, site, shot, "Opera, box 3", "120")
    order_url = page.url
    await page.get_by_role("link", name="My orders").click()
    await expect(page.get_by_role("cell", name="awaiting payment")).to_be_visible()
    await page.goto(order_url)
    await page.get_by_role("button", name="Cancel order").click()
    await expect(page.get_by_text("Status: cancelled")).to_be_visible()
    await expect(page.get_by_role("button", name="Pay")).to_have_count(0)
    await shot(page, "cancelled")
    await page.goto("/")
    await expect(page.get_by_role("link", name=re.compile("Opera, box 3"))).to_be_visible()


async def test_a_price_no_card_can_pay_is_refused_on_the_form(
    browser: Browser, site: str, shot: Shot
) -> None:
    page = await new_page(browser, site)
    await sign_up(page, shot, email())
    await page.get_by_role("link", name="Sell a ticket").click()
    await page.get_by_label("Title").fill("Raffle stub")
    await page.get_by_label("Price").fill("0.49")
    await page.get_by_role("button", name="Sell ticket").click()
    await expect(page.get_by_text("Price must be at least 0.50")).to_be_visible()
    await shot(page, "price-too-low")
    await page.get_by_label("Price").fill("twenty")
    await page.get_by_role("button", name="Sell ticket").click()
    await expect(page.get_by_text("Price must be a number")).to_be_visible()
    await page.get_by_label("Price").fill("25.5")
    await page.get_by_role("button", name="Sell ticket").click()
    await expect(page.get_by_role("heading", name="Raffle stub")).to_be_visible()
    await expect(page.get_by_label("Price")).to_have_value("25.50")  # the seller's edit form


async def test_a_bad_sign_in_shows_the_error(browser: Browser, site: str, shot: Shot) -> None:
    page = await new_page(browser, site)
    await page.goto("/auth/signin")
    form = page.get_by_role("form", name="Account sign-in")
    await form.get_by_label("Email").fill("nobody@example.com")
    await form.get_by_label("Password").fill("wrong-password")
    await form.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_text("Invalid credentials")).to_be_visible()
    await shot(page, "bad-signin")


async def test_a_magic_link_from_the_mailbox_signs_in(
    browser: Browser, site: str, shot: Shot
) -> None:
    address = email()
    page = await new_page(browser, site)
    await page.goto("/auth/signin")
    form = page.get_by_role("form", name="Magic link")
    await form.get_by_label("Email").fill(address)
    await form.get_by_role("button", name="Email me a sign-in link").click()
    await expect(page.get_by_text("we sent you a sign-in link")).to_be_visible()
    await shot(page, "link-sent")
    await page.goto("/dev/mailbox")
    await shot(page, "mailbox")
    mail = page.get_by_role("article").filter(has_text=address)
    await mail.get_by_role("link", name="Sign in to Ticketing").click()
    await expect(page.get_by_text(address)).to_be_visible()
    await expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    await shot(page, "signed-in-by-link")


def test_a_form_posted_from_another_site_is_refused(site: str) -> None:
    """Login CSRF: another site's form must not sign the visitor in as someone else."""
    credentials = {"email": email(), "password": "secret-pass"}
    with httpx.Client(base_url=site) as client:
        for header in ({"Sec-Fetch-Site": "cross-site"}, {"Origin": "https://elsewhere.example"}):
            refused = client.post("/auth/signup", data=credentials, headers=header)
            assert refused.status_code == 403, header
            assert "set-cookie" not in refused.headers
        own = client.post(
            "/auth/signup", data=credentials, headers={"Sec-Fetch-Site": "same-origin"}
        )
        assert own.status_code == 303 and "session=" in own.headers["set-cookie"]
        # Another site's link cannot sign anyone out: the page asks, and its form does it.
        asked = client.get("/auth/signout", headers={"Sec-Fetch-Site": "cross-site"})
        assert asked.status_code == 200 and 'action="/auth/signout"' in asked.text
        assert client.get("/api/users/currentuser").json()["currentUser"] is not None
        # Nor a HEAD of it (a link preview's, a checker's).
        assert client.head("/auth/signout").status_code == 200
        assert client.get("/api/users/currentuser").json()["currentUser"] is not None
        signed_out = client.post("/auth/signout", headers={"Origin": site})
        assert signed_out.status_code == 303
        assert client.get("/api/users/currentuser").json()["currentUser"] is None


def test_a_visitor_without_a_session_is_nobody_whoever_signed_in_before(site: str) -> None:
    """The site calls the APIs through one HTTP client for every visitor: the session an answer
    sets (a sign-up here) goes to that visitor's browser, never along with the next visitor's
    calls."""
    address = email()
    same_origin = {"Sec-Fetch-Site": "same-origin"}
    with httpx.Client(base_url=site) as someone:
        credentials = {"email": address, "password": "secret-pass"}
        assert someone.post("/auth/signup", data=credentials, headers=same_origin).is_redirect
    with httpx.Client(base_url=site) as nobody:
        assert address not in nobody.get("/").text
        listed = nobody.post(
            "/tickets/new", data={"title": "Not theirs", "price": "5"}, headers=same_origin
        )
        assert listed.is_redirect and listed.headers["location"].startswith("/auth/signin")
        titles = [t["title"] for t in nobody.get("/api/tickets").json()]
    assert "Not theirs" not in titles


def test_a_form_sent_after_the_session_ended_leads_to_sign_in(site: str) -> None:
    """A session that ended in another tab: the pay and edit forms send the visitor to sign in,
    not to a page that says the order does not exist or shows nothing."""
    some_id = str(uuid.uuid4())
    same_origin = {"Sec-Fetch-Site": "same-origin"}
    with httpx.Client(base_url=site) as signed_out:
        for path, form, back_to in (
            (f"/orders/{some_id}/pay", {"token": "tok_visa"}, f"/orders/{some_id}"),
            (f"/orders/{some_id}/cancel", {}, f"/orders/{some_id}"),
            (f"/tickets/{some_id}", {"title": "Edited", "price": "10"}, f"/tickets/{some_id}"),
        ):
            sent = signed_out.post(path, data=form, headers=same_origin)
            assert sent.is_redirect, path
            location = httpx.URL(sent.headers["location"])
            assert location.path == "/auth/signin" and location.params["next"] == back_to


def test_sign_in_leads_back_to_the_page_that_asked_for_it_and_only_to_this_site(
    site: str,
) -> None:
    address = email()
    same_origin = {"Sec-Fetch-Site": "same-origin"}
    with httpx.Client(base_url=site) as visitor:
        credentials = {"email": address, "password": "secret-pass"}
        visitor.post("/auth/signup", data=credentials, headers=same_origin)
        visitor.post("/auth/signout", headers=same_origin)
        page = visitor.get("/auth/signin", params={"next": "/orders"})
        assert 'name="next" value="/orders"' in page.text
        for asked, lands in (
            ("/orders", "/orders"),
            ("//evil.example/", "/"),
            ("https://x.io", "/"),
            ("/\\evil.example", "/"),  # a backslash is a slash to a browser
            ("/\t/evil.example", "/"),  # and a tab is dropped
        ):
            sent = {**credentials, "next": asked}
            signed_in = visitor.post("/auth/signin", data=sent, headers=same_origin)
            assert signed_in.is_redirect and signed_in.headers["location"] == lands, asked


def test_every_page_names_an_icon_the_site_serves(site: str) -> None:
    with httpx.Client(base_url=site) as visitor:
        home = visitor.get("/")
        icon = re.search(r'<link rel="icon" href="([^"]+)"', home.text)
        assert icon, home.text
        served = visitor.get(icon.group(1))
    assert served.status_code == 200
    assert served.headers["content-type"].startswith("image/svg+xml")


def test_a_price_that_is_not_a_number_is_said_to_be_one(site: str) -> None:
    same_origin = {"Sec-Fetch-Site": "same-origin"}
    with httpx.Client(base_url=site) as seller:
        credentials = {"email": email(), "password": "secret-pass"}
        seller.post("/auth/signup", data=credentials, headers=same_origin)
        for typed in ("NaN", "Infinity", "-inf", "twenty"):
            form = {"title": "Show", "price": typed}
            page = seller.post("/tickets/new", data=form, headers=same_origin)
            assert page.status_code == 400, typed
            assert "Price must be a number" in page.text, typed
