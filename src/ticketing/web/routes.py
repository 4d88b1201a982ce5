"""The pages: each calls the APIs as the visitor and renders a template."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any
from urllib.parse import urlencode, urlsplit

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from ticketing.common.auth import COOKIE_NAME, current_user
from ticketing.common.events import LEAST_CARD_PAYMENT
from ticketing.common.head import is_head
from ticketing.common.ids import is_id
from ticketing.common.mailbox import mailbox_dir, read_mailbox
from ticketing.common.same_origin import from_another_site
from ticketing.web.client import Api, ApiResult
from ticketing.web.settings import WebSettings

router = APIRouter(include_in_schema=False)

TEST_CARDS = [("tok_visa", "Visa, succeeds"), ("tok_chargeDeclined", "Visa, declined")]


@dataclass
class Visitor:
    api: Api
    user: dict[str, Any] | None
    settings: WebSettings
    templates: Jinja2Templates


async def _visitor(request: Request) -> Visitor:
    client_ip = request.client.host if request.client else None
    api = Api(request.app.state.http, request.cookies.get(COOKIE_NAME), client_ip)
    # The session is a JWT every service verifies with the shared key; so does the web, which
    # spares an API call on every page (and every second of a polled order status).
    claims = await current_user(request)
    user = claims.model_dump() if claims else None
    state = request.app.state
    return Visitor(api=api, user=user, settings=state.settings, templates=state.templates)


VisitorDep = Annotated[Visitor, Depends(_visitor)]


def render(
    request: Request, visitor: Visitor, name: str, status: int = 200, **context: Any
) -> HTMLResponse:
    context = {"user": visitor.user, "dev": visitor.settings.is_dev, **context}
    return visitor.templates.TemplateResponse(request, name, context, status_code=status)


def redirect(url: str, result: ApiResult | None = None) -> RedirectResponse:
    """A 303 that also carries any cookie the API set (sign-in, sign-out)."""
    response = RedirectResponse(url, status_code=303)
    for cookie in result.set_cookies if result else []:
        response.headers.append("set-cookie", cookie)
    return response


def sign_in_first(back_to: str) -> RedirectResponse:
    """To the sign-in page, which sends the visitor back here once they are signed in."""
    return redirect(f"/auth/signin?{urlencode({'next': back_to})}")


def _local(path: str | None) -> str:
    """Where to go after signing in: a path of this site only (no open redirect). Browsers
    drop tabs and newlines from a URL and read a backslash as a slash, so a path with any of
    them, or that starts like another host's address, is not taken."""
    if not path or not path.startswith("/") or path.startswith("//"):
        return "/"
    if "\\" in path or any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in path):
        return "/"
    parts = urlsplit(path)
    return path if not parts.scheme and not parts.netloc else "/"


def _first_problem(result: ApiResult) -> str:
    return next(iter(result.errors().values()), "Something went wrong; please try again.")


def not_found(request: Request, visitor: Visitor, what: str) -> HTMLResponse:
    return render(request, visitor, "error.html", 404, title=f"{what} not found",
                  message=f"This {what.lower()} does not exist.")  # fmt: skip


async def _form(request: Request) -> dict[str, str]:
    # Text fields only: a file sent in a multipart form is no title or price.
    return {k: v for k, v in (await request.form()).items() if isinstance(v, str)}


@router.get("/")
async def index(request: Request, visitor: VisitorDep) -> HTMLResponse:
    result = await visitor.api.call("GET", "/api/tickets")
    return render(request, visitor, "index.html", tickets=result.body if result.ok else [])


@router.post("/auth/magic-link")
async def magic_link(request: Request, visitor: VisitorDep) -> Response:
    form = await _form(request)
    result = await visitor.api.call("POST", "/api/users/magic-link", {"email": form.get("email")})
    context: dict[str, Any] = {"mode": "signin", "form": {}, "link_form": form}
    if result.ok:
        return render(request, visitor, "auth.html", **context, errors={}, link_sent=True)
    link_errors = result.errors()
    return render(request, visitor, "auth.html", 400, **context, errors={}, link_errors=link_errors)


@router.get("/auth/{mode}")
async def auth_page(request: Request, visitor: VisitorDep, mode: str) -> Response:
    if mode == "signout":
        # A link or an image on another site must not sign anyone out: from there, the page
        # asks first (its form posts from here); so does a HEAD.
        if from_another_site(request.scope) or is_head(request.scope):
            return render(request, visitor, "signout.html")
        return redirect("/", await visitor.api.call("POST", "/api/users/signout"))
    if mode not in ("signup", "signin"):
        return not_found(request, visitor, "Page")
    back_to = _local(request.query_params.get("next"))
    return render(request, visitor, "auth.html", mode=mode, errors={}, form={"next": back_to})


@router.post("/auth/{mode}")
async def auth_submit(request: Request, visitor: VisitorDep, mode: str) -> Response:
    if mode == "signout":
        return redirect("/", await visitor.api.call("POST", "/api/users/signout"))
    if mode not in ("signup", "signin"):
        return not_found(request, visitor, "Page")
    form = await _form(request)
    body = {"email": form.get("email", ""), "password": form.get("password", "")}
    result = await visitor.api.call("POST", f"/api/users/{mode}", body)
    if result.ok:
        return redirect(_local(form.get("next")), result)
    status = 429 if result.status == 429 else 400  # too many tries: the page says so, as the API
    return render(
        request, visitor, "auth.html", status, mode=mode, errors=result.errors(), form=form
    )


@router.get("/tickets/new")
async def new_ticket(request: Request, visitor: VisitorDep) -> Response:
    if visitor.user is None:
        return sign_in_first("/tickets/new")
    return render(request, visitor, "ticket_new.html", errors={}, form={})


def _price_problem(form: dict[str, str]) -> dict[str | None, str]:
    """What the site says of a price before the API is asked: that it is not a number at all,
    or under what a card can pay (the API lists any price greater than 0, but the site does
    not list a ticket its buyers could not pay for)."""
    typed = form.get("price", "").strip()
    try:
        price = Decimal(typed)
    except InvalidOperation:
        price = Decimal("NaN")
    if not price.is_finite():  # "NaN" and "Infinity" parse, and compare with nothing
        return {"price": "Price must be a number, like 25 or 25.50"} if typed else {}
    if 0 < price < LEAST_CARD_PAYMENT:
        return {"price": f"Price must be at least {LEAST_CARD_PAYMENT}, the least a card can pay"}
    return {}


@router.post("/tickets/new")
async def create_ticket(request: Request, visitor: VisitorDep) -> Response:
    if visitor.user is None:
        return sign_in_first("/tickets/new")
    form = await _form(request)
    if errors := _price_problem(form):
        return render(request, visitor, "ticket_new.html", 400, errors=errors, form=form)
    body = {"title": form.get("title", ""), "price": form.get("price", "")}
    result = await visitor.api.call("POST", "/api/tickets", body)
    if result.ok:
        return redirect(f"/tickets/{result.body['id']}")
    if result.status == 401:
        return sign_in_first("/tickets/new")
    return render(request, visitor, "ticket_new.html", 400, errors=result.errors(), form=form)


async def _ticket_page(
    request: Request, visitor: Visitor, ticket_id: str, status: int = 200, **context: Any
) -> Response:
    if not is_id(ticket_id):
        return not_found(request, visitor, "Ticket")
    result = await visitor.api.call("GET", f"/api/tickets/{ticket_id}")
    if not result.ok:
        return not_found(request, visitor, "Ticket")
    ticket = result.body
    context.setdefault("errors", {})
    price = f"{Decimal(str(ticket['price'])):.2f}"  # as money is written: 25.50, not 25.5
    context.setdefault("form", {"title": ticket["title"], "price": price})
    mine = visitor.user is not None and visitor.user["id"] == ticket["userId"]
    return render(request, visitor, "ticket.html", status, ticket=ticket, mine=mine, **context)


@router.get("/tickets/{ticket_id}")
async def show_ticket(request: Request, visitor: VisitorDep, ticket_id: str) -> Response:
    return await _ticket_page(request, visitor, ticket_id)


@router.post("/tickets/{ticket_id}")
async def edit_ticket(request: Request, visitor: VisitorDep, ticket_id: str) -> Response:
    if visitor.user is None:
        return sign_in_first(f"/tickets/{ticket_id}")
    if not is_id(ticket_id):
        return not_found(request, visitor, "Ticket")
    form = await _form(request)
    if errors := _price_problem(form):
        return await _ticket_page(request, visitor, ticket_id, 400, errors=errors, form=form)
    body = {"title": form.get("title", ""), "price": form.get("price", "")}
    result = await visitor.api.call("PUT", f"/api/tickets/{ticket_id}", body)
    if result.ok:
        return await _ticket_page(request, visitor, ticket_id, notice="Saved.")
    if result.status == 401:  # the session ended meanwhile (the form is only the seller's)
        return sign_in_first(f"/tickets/{ticket_id}")
    return await _ticket_page(request, visitor, ticket_id, 400, errors=result.errors(), form=form)


@router.post("/tickets/{ticket_id}/purchase")
async def purchase(request: Request, visitor: VisitorDep, ticket_id: str) -> Response:
    if visitor.user is None:
        return sign_in_first(f"/tickets/{ticket_id}")
    if not is_id(ticket_id):
        return not_found(request, visitor, "Ticket")
    result = await visitor.api.call("POST", "/api/orders", {"ticketId": ticket_id})
    if result.ok:
        return redirect(f"/orders/{result.body['id']}")
    problem = _first_problem(result)
    if result.status == 404:
        problem = "This ticket is no longer for sale."
    status = 503 if result.status == 503 else 400  # "try again in a moment" is no wrong input
    return await _ticket_page(request, visitor, ticket_id, status, problem=problem)


@router.get("/orders")
async def orders(request: Request, visitor: VisitorDep) -> Response:
    if visitor.user is None:
        return sign_in_first("/orders")
    result = await visitor.api.call("GET", "/api/orders")
    return render(request, visitor, "orders.html", orders=result.body if result.ok else [])


async def _order(visitor: Visitor, order_id: str) -> dict[str, Any] | None:
    if not is_id(order_id):
        return None
    result = await visitor.api.call("GET", f"/api/orders/{order_id}")
    return dict(result.body) if result.ok else None


async def _own_order(
    request: Request, visitor: Visitor, order_id: str
) -> dict[str, Any] | Response:
    """The signed-in visitor's order, else the page to go to instead (sign-in, not found)."""
    if visitor.user is None:
        return sign_in_first(f"/orders/{order_id}")
    order = await _order(visitor, order_id)
    return order if order is not None else not_found(request, visitor, "Order")


def _order_context(visitor: Visitor, order: dict[str, Any]) -> dict[str, Any]:
    return {
        "order": order,
        "cards": TEST_CARDS,
        "publishable_key": visitor.settings.stripe_publishable_key,
    }


@router.get("/orders/{order_id}")
async def show_order(request: Request, visitor: VisitorDep, order_id: str) -> Response:
    order = await _own_order(request, visitor, order_id)
    if isinstance(order, Response):
        return order
    return render(request, visitor, "order.html", **_order_context(visitor, order))


@router.get("/orders/{order_id}/status")
async def order_status(request: Request, visitor: VisitorDep, order_id: str) -> Response:
    """The live part of the order page, polled by htmx until the order is settled."""
    order = await _order(visitor, order_id)
    if order is None:
        return Response(status_code=286)  # htmx: stop polling
    return render(request, visitor, "order_status.html", order=order, live=True)


@router.post("/orders/{order_id}/cancel")
async def cancel(request: Request, visitor: VisitorDep, order_id: str) -> Response:
    order = await _own_order(request, visitor, order_id)
    if isinstance(order, Response):
        return order
    result = await visitor.api.call("DELETE", f"/api/orders/{order_id}")
    if result.ok:
        return redirect(f"/orders/{order_id}")
    problem = _first_problem(result)  # paid meanwhile, say
    order = await _order(visitor, order_id) or order
    context = _order_context(visitor, order)
    return render(request, visitor, "order.html", 400, problem=problem, **context)


@router.post("/orders/{order_id}/pay")
async def pay(request: Request, visitor: VisitorDep, order_id: str) -> Response:
    order = await _own_order(request, visitor, order_id)
    if isinstance(order, Response):
        return order
    form = await _form(request)
    body = {"orderId": order_id, "token": form.get("token", "")}
    result = await visitor.api.call("POST", "/api/payments", body)
    if result.ok:
        return redirect(f"/orders/{order_id}")
    problem = _first_problem(result)
    if result.status == 404:
        problem = "This order cannot be paid for here; please contact us."
    context = _order_context(visitor, order)
    status = result.status if result.status in (402, 503) else 400
    return render(request, visitor, "order.html", status, problem=problem, **context)


@router.get("/dev/mailbox")
async def dev_mailbox(request: Request, visitor: VisitorDep) -> Response:
    if not visitor.settings.is_dev:
        return not_found(request, visitor, "Page")
    mails = read_mailbox(mailbox_dir(visitor.settings.data_dir))
    return render(request, visitor, "mailbox.html", mails=mails)
