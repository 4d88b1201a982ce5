"""A local stand-in for Stripe: the endpoints the payments service calls, spoken like Stripe.

There is no network in development and tests, so the official SDK is pointed here instead.
Status codes, error shapes, idempotency and webhook signatures follow Stripe's documented
behaviour, so code that works against the sandbox works against Stripe.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import hmac
import json
import secrets
import socket
import string
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import httpx
import uvicorn
from fastapi import APIRouter, FastAPI, Request, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp

# Events carry the account's API version, not the request's: this is the one stripe 16.1 pins.
API_VERSION = "2026-10-28.endive"
WEBHOOK_RETRY_DELAYS = (0.5, 2.0, 8.0)  # Stripe retries for days; a sandbox need not
CURRENCIES = frozenset({"usd", "eur", "gbp", "chf", "cad", "aud", "nzd", "jpy", "sek", "dkk"})
MINIMUM_AMOUNT = {"usd": 50, "eur": 50, "gbp": 30, "chf": 50, "cad": 50, "aud": 50}
MAXIMUM_AMOUNT = 99_999_999
_DECLINE = ("generic_decline", "Your card was declined.")
_NO_FUNDS = ("insufficient_funds", "Your card has insufficient funds.")
_OUTCOMES = {"visa": None, "mastercard": None, "chargeDeclined": _DECLINE}
_OUTCOMES["chargeDeclinedInsufficientFunds"] = _NO_FUNDS
# Stripe's test cards, as tok_visa and pm_card_visa: None succeeds, else (decline_code, message).
TEST_CARDS = {f"{p}{name}": out for name, out in _OUTCOMES.items() for p in ("tok_", "pm_card_")}
Params = dict[str, Any]


class ApiError(Exception):
    """An error as Stripe returns it; `saved`: the request took effect, so retries replay it."""

    def __init__(self, status: int, message: str, *, saved: bool = False, **fields: Any) -> None:
        super().__init__(message)
        self.status, self.saved = status, saved
        fields = {"type": "invalid_request_error", "message": message, **fields}
        self.fields = {k: v for k, v in fields.items() if v is not None}
        if code := self.fields.get("code"):
            self.fields["doc_url"] = f"https://stripe.com/docs/error-codes/{code.replace('_', '-')}"

    def body(self) -> dict[str, Any]:
        """The JSON body Stripe sends with this error."""
        return {"error": self.fields}


def _invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Delivery:
    """One attempt to deliver one event to the webhook endpoint."""

    event_id: str
    event_type: str
    attempt: int
    status_code: int | None  # None when the endpoint could not be reached


@dataclass(frozen=True)
class _Saved:
    fingerprint: tuple[str, str, Params]
    status: int
    body: bytes
    request_id: str


class Sandbox:
    """Everything the sandbox knows, in memory."""

    def __init__(self, *, webhook_url: str | None, webhook_secret: str | None) -> None:
        self.webhook_url, self.webhook_secret = webhook_url, webhook_secret
        self.payment_intents: dict[str, Params] = {}
        self.charges: list[Params] = []  # succeeded charges only, as Stripe Charge objects
        self.refunds: list[Params] = []
        self.events: list[Params] = []
        self.retry_delays: tuple[float, ...] = WEBHOOK_RETRY_DELAYS
        self.saved: dict[tuple[str, str], _Saved] = {}  # (api key, idempotency key)
        self.methods: dict[str, str] = {}  # pm_ id -> the test card it stands for
        self._deliveries: list[Delivery] = []
        self._tasks: set[asyncio.Task[None]] = set()
        # One client for every delivery: a new one per webhook costs a TLS context each time.
        self._client: httpx.AsyncClient | None = None

    def deliveries(self) -> list[Delivery]:
        """Every webhook delivery attempt so far, oldest first."""
        return list(self._deliveries)

    def emit(self, event_type: str, obj: Params) -> None:
        """Record an event and deliver it in the background, never inside the API request."""
        event = {
            "id": _id("evt"),
            "object": "event",
            "api_version": API_VERSION,
            "created": int(time.time()),
            "data": {"object": copy.deepcopy(obj)},
            "livemode": False,
            "pending_webhooks": 1 if self.webhook_url else 0,
            "type": event_type,
        }
        self.events.append(event)
        if self.webhook_url:
            task = asyncio.get_running_loop().create_task(self._deliver(event))
            self._tasks.add(task)  # the loop keeps only a weak reference
            task.add_done_callback(self._tasks.discard)

    async def _deliver(self, event: Params) -> None:
        payload = json.dumps(event).encode()
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=10.0)
        for attempt, delay in enumerate((0.0, *self.retry_delays), start=1):
            await asyncio.sleep(delay)
            status = await self._post_event(self._client, payload)
            self._deliveries.append(Delivery(event["id"], event["type"], attempt, status))
            if status is not None and 200 <= status < 300:
                return

    async def _post_event(self, client: httpx.AsyncClient, payload: bytes) -> int | None:
        assert self.webhook_url and self.webhook_secret
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
            "Stripe-Signature": sign_payload(payload, self.webhook_secret),  # fresh per attempt
        }
        try:
            response = await client.post(self.webhook_url, content=payload, headers=headers)
        except httpx.HTTPError:
            return None
        return response.status_code

    async def aclose(self) -> None:
        """Abandon deliveries still pending."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def sign_payload(payload: bytes, secret: str, *, timestamp: int | None = None) -> str:
    """A Stripe-Signature header value for `payload`, made the way Stripe signs webhooks."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def parse_form(body: bytes) -> Params:
    """Stripe's form encoding (`a[b][0]=c`) as nested dicts; list indexes stay string keys."""
    root: Params = {}
    for key, value in parse_qsl(body.decode(), keep_blank_values=True):
        head, _, rest = key.partition("[")
        parts = [head, *(rest[:-1].split("][") if rest else [])]
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise _invalid(f"Invalid object: {key}", head)
        node[parts[-1] or str(len(node))] = value  # `a[]=x` appends
    return root


def _id(prefix: str) -> str:
    alphabet = string.ascii_letters + string.digits
    return prefix + "_" + "".join(secrets.choice(alphabet) for _ in range(24))


def _as_list(value: Any) -> list[Any]:
    # Lists arrive as {"0": .., "1": ..}; Stripe reads them as arrays where arrays are expected.
    if isinstance(value, dict):
        return [value[k] for k in sorted(value, key=lambda k: int(k) if k.isdigit() else -1)]
    return [value]


def _amount(params: Params) -> int:
    raw = params.get("amount")
    if raw is None:
        raise _invalid("Missing required param: amount.", "amount", "parameter_missing")
    if not isinstance(raw, str) or not raw.lstrip("-").isdigit():
        raise _invalid(f"Invalid integer: {raw}", "amount", "parameter_invalid_integer")
    if int(raw) < 1:
        message = "This value must be greater than or equal to 1."
        raise _invalid(message, "amount", "parameter_invalid_integer")
    return int(raw)


def _currency(params: Params, amount: int) -> str:
    raw = params.get("currency")
    if raw is None:
        raise _invalid("Missing required param: currency.", "currency", "parameter_missing")
    currency = str(raw).lower()
    if currency not in CURRENCIES:
        raise _invalid(f"Invalid currency: {raw}.", "currency")
    if amount < MINIMUM_AMOUNT.get(currency, 1):
        minimum = MINIMUM_AMOUNT[currency] / 100
        raise _invalid(
            f"Amount must be at least {minimum:.2f} {currency}", "amount", "amount_too_small"
        )
    if amount > MAXIMUM_AMOUNT:
        raise _invalid("Amount must be no more than 999,999.99", "amount", "amount_too_large")
    return currency


def _metadata(params: Params) -> dict[str, str]:
    raw = params.get("metadata", {})
    if raw == "":
        return {}  # Stripe's way of saying "no metadata"
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise _invalid("Invalid object", "metadata")
    if len(raw) > 50 or any(len(k) > 40 or len(v) > 500 for k, v in raw.items()):
        raise _invalid("Metadata: at most 50 keys, 40-character keys, 500-character values.")
    return dict(raw)


def _card(params: Params) -> str | None:
    """The test card named by `payment_method` or `payment_method_data`, if any."""
    if (method := params.get("payment_method")) is not None:
        if method not in TEST_CARDS or not str(method).startswith("pm_"):
            raise _invalid(
                f"No such PaymentMethod: '{method}'", "payment_method", "resource_missing"
            )
        return str(method)
    data = params.get("payment_method_data")
    if data is None:
        return None
    if not isinstance(data, dict) or data.get("type") != "card":
        param = "payment_method_data[type]"
        raise _invalid(f"Missing or unsupported param: {param}.", param, "parameter_missing")
    token = data.get("card", {}).get("token") if isinstance(data.get("card"), dict) else None
    if token not in TEST_CARDS or not str(token).startswith("tok_"):
        param = "payment_method_data[card][token]"
        raise _invalid(f"No such token: '{token}'", param, "resource_missing")
    return str(token)


def _bool(params: Params, name: str) -> bool:
    raw = params.get(name, "false")
    if raw not in ("true", "false"):
        raise _invalid(f"Invalid boolean: {raw}", name)
    return bool(raw == "true")


def _find_intent(sandbox: Sandbox, intent_id: str, param: str) -> Params:
    if intent_id in sandbox.payment_intents:
        return sandbox.payment_intents[intent_id]
    status = 404 if param == "intent" else 400  # Stripe: 404 only for the object in the path
    message = f"No such payment_intent: '{intent_id}'"
    raise ApiError(status, message, param=param, code="resource_missing")


def create_intent(sandbox: Sandbox, params: Params) -> Params:
    """POST /v1/payment_intents."""
    amount = _amount(params)
    currency = _currency(params, amount)
    metadata, card, confirm = _metadata(params), _card(params), _bool(params, "confirm")
    types = _as_list(params["payment_method_types"]) if "payment_method_types" in params else None
    if types is not None and types != ["card"]:
        raise _invalid(
            "The sandbox supports only payment_method_types ['card'].", "payment_method_types"
        )
    automatic = (
        params.get("automatic_payment_methods", {"enabled": "true"}) if types is None else None
    )
    intent_id = _id("pi")
    intent: Params = {
        "id": intent_id,
        "object": "payment_intent",
        "amount": amount,
        "amount_received": 0,
        "automatic_payment_methods": _automatic(automatic),
        "capture_method": "automatic",
        "client_secret": f"{intent_id}_secret_{secrets.token_hex(12)}",
        "confirmation_method": "automatic",
        "created": int(time.time()),
        "currency": currency,
        "description": params.get("description"),
        "last_payment_error": None,
        "latest_charge": None,
        "livemode": False,
        "metadata": metadata,
        "payment_method": None,
        "payment_method_types": ["card"],
        "status": "requires_payment_method",
    }
    if confirm:
        _check_return_url(intent, params)
        if card is None:
            message = "You cannot confirm this PaymentIntent because it's missing a payment method."
            raise _invalid(message, code="payment_intent_unexpected_state")
    sandbox.payment_intents[intent_id] = intent
    if card is not None:
        _attach(sandbox, intent, card)
    return _confirm(sandbox, intent) if confirm else intent


def _automatic(raw: Any) -> Params | None:
    if not isinstance(raw, dict) or raw.get("enabled") != "true":
        return None
    return {"enabled": True, "allow_redirects": raw.get("allow_redirects", "always")}


def _check_return_url(intent: Params, params: Params) -> None:
    # Stripe refuses this on API versions since 2023-08-16: it is a production-only surprise
    # unless the sandbox refuses it too.
    automatic = intent["automatic_payment_methods"]
    if automatic and automatic["allow_redirects"] != "never" and not params.get("return_url"):
        message = (
            "This PaymentIntent accepts payment methods that might redirect your customer, so you"
            " must provide a `return_url`, or set `payment_method_types` or"
            " `automatic_payment_methods[allow_redirects]` to `never`."
        )
        raise _invalid(message, "return_url")


def _attach(sandbox: Sandbox, intent: Params, card: str) -> None:
    method_id = _id("pm")
    sandbox.methods[method_id] = card
    intent.update(payment_method=method_id, status="requires_confirmation")


def confirm_intent(sandbox: Sandbox, intent_id: str, params: Params) -> Params:
    """POST /v1/payment_intents/{id}/confirm."""
    intent = _find_intent(sandbox, intent_id, "intent")
    card = _card(params)
    if intent["status"] not in ("requires_payment_method", "requires_confirmation"):
        message = (
            f"You cannot confirm this PaymentIntent because it has a status of {intent['status']}."
        )
        raise _invalid(message, code="payment_intent_unexpected_state")
    if card is None and intent["payment_method"] is None:
        message = "You cannot confirm this PaymentIntent because it's missing a payment method."
        raise _invalid(message, code="payment_intent_unexpected_state")
    _check_return_url(intent, params)
    if card is not None:
        _attach(sandbox, intent, card)
    return _confirm(sandbox, intent)


def _confirm(sandbox: Sandbox, intent: Params) -> Params:
    decline = TEST_CARDS[sandbox.methods[intent["payment_method"]]]
    if decline is not None:
        error = {"type": "card_error", "code": "card_declined", "decline_code": decline[0]}
        intent.update(status="requires_payment_method", payment_method=None)
        intent["last_payment_error"] = {**error, "message": decline[1]}
        # The PaymentIntent changed, so Stripe saves this 402 for idempotent replay.
        raise ApiError(402, decline[1], saved=True, **error, payment_intent=copy.deepcopy(intent))
    charge = {
        "id": _id("ch"),
        "object": "charge",
        "amount": intent["amount"],
        "amount_captured": intent["amount"],
        "amount_refunded": 0,
        "captured": True,
        "created": int(time.time()),
        "currency": intent["currency"],
        "livemode": False,
        "metadata": dict(intent["metadata"]),
        "paid": True,
        "payment_intent": intent["id"],
        "payment_method": intent["payment_method"],
        "refunded": False,
        "status": "succeeded",
    }
    sandbox.charges.append(charge)
    intent.update(status="succeeded", amount_received=intent["amount"], latest_charge=charge["id"])
    intent["last_payment_error"] = None
    sandbox.emit("payment_intent.succeeded", intent)
    return intent


def create_refund(sandbox: Sandbox, params: Params) -> Params:
    """POST /v1/refunds, by `payment_intent` or `charge`."""
    charge = _refundable_charge(sandbox, params)
    left = charge["amount"] - charge["amount_refunded"]
    amount = _amount(params) if "amount" in params else left
    if amount > left:
        message = f"Refund amount ({amount}) is greater than unrefunded amount on charge ({left})"
        raise _invalid(message, "amount", "amount_too_large")
    refund = {
        "id": _id("re"),
        "object": "refund",
        "amount": amount,
        "charge": charge["id"],
        "created": int(time.time()),
        "currency": charge["currency"],
        "metadata": _metadata(params),
        "payment_intent": charge["payment_intent"],
        "reason": params.get("reason"),
        "status": "succeeded",
    }
    sandbox.refunds.append(refund)
    charge["amount_refunded"] += amount
    charge["refunded"] = charge["amount_refunded"] == charge["amount"]
    sandbox.emit("charge.refunded", charge)
    return refund


def _refundable_charge(sandbox: Sandbox, params: Params) -> Params:
    if "payment_intent" in params:
        intent = _find_intent(sandbox, str(params["payment_intent"]), "payment_intent")
        charge_id = intent["latest_charge"]
        if intent["status"] != "succeeded":
            message = f"This PaymentIntent ({intent['id']}) does not have a successful charge."
            raise _invalid(message, "payment_intent")
    elif "charge" in params:
        charge_id = params["charge"]
    else:
        raise _invalid(
            "Missing required param: payment_intent.", "payment_intent", "parameter_missing"
        )
    charge = next((c for c in sandbox.charges if c["id"] == charge_id), None)
    if charge is None:
        raise _invalid(f"No such charge: '{charge_id}'", "charge", "resource_missing")
    if charge["refunded"]:
        message = f"Charge {charge_id} has already been refunded."
        raise _invalid(message, code="charge_already_refunded")
    return charge


def _api_key(request: Request) -> str:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if not scheme:
        message = (
            "You did not provide an API key. You need to provide your API key in the"
            " Authorization header, using Bearer auth (e.g. 'Authorization: Bearer sk_...')."
        )
        raise ApiError(401, message)
    if scheme.lower() != "bearer" or not key.startswith(("sk_", "rk_")):
        raise ApiError(401, f"Invalid API Key provided: {key[:8]}****{key[-4:]}")
    return key


def _json(status: int, body: bytes, headers: dict[str, str]) -> Response:
    return Response(body, status, headers, media_type="application/json")


async def _idempotent(request: Request, action: Callable[[Params], Params]) -> Response:
    """Run a POST once per idempotency key, replaying its saved response to any retry."""
    sandbox: Sandbox = request.app.state.sandbox
    api_key = _api_key(request)
    params = parse_form(await request.body())
    key = request.headers.get("idempotency-key")
    if key and len(key) > 255:
        raise _invalid("Idempotency keys can be at most 255 characters long.")
    # Nothing below awaits, so look-up, action and save are one step of the event loop: two
    # concurrent retries with one key can never both run the action.
    fingerprint = (request.method, request.url.path, params)
    saved = sandbox.saved.get((api_key, key)) if key else None
    if saved is not None:
        if saved.fingerprint != fingerprint:
            message = (
                "Keys for idempotent requests can only be used with the same parameters they"
                f" were first used with. Try using a key other than '{key}' if you meant to"
                " execute a different request."
            )
            raise ApiError(400, message, type="idempotency_error")
        replay = {"Idempotent-Replayed": "true", "Original-Request": saved.request_id}
        return _json(saved.status, saved.body, {"Request-Id": _id("req"), **replay})
    request_id = _id("req")
    try:
        status, body = 200, json.dumps(action(params)).encode()
    except ApiError as exc:
        # Stripe saves only requests that took effect; one rejected up front may be retried.
        if not exc.saved:
            raise
        status, body = exc.status, json.dumps(exc.body()).encode()
    if key:
        sandbox.saved[(api_key, key)] = _Saved(fingerprint, status, body, request_id)
    return _json(
        status, body, {"Request-Id": request_id, **({"Idempotency-Key": key} if key else {})}
    )


def _router(prefix: str) -> APIRouter:
    router = APIRouter(prefix=prefix)

    def state(request: Request) -> Sandbox:
        sandbox: Sandbox = request.app.state.sandbox
        return sandbox

    @router.post("/v1/payment_intents")
    async def post_intent(request: Request) -> Response:
        return await _idempotent(request, lambda p: create_intent(state(request), p))

    @router.post("/v1/payment_intents/{intent_id}/confirm")
    async def post_confirm(request: Request, intent_id: str) -> Response:
        return await _idempotent(request, lambda p: confirm_intent(state(request), intent_id, p))

    @router.get("/v1/payment_intents/{intent_id}")
    async def get_intent(request: Request, intent_id: str) -> Response:
        _api_key(request)
        intent = _find_intent(state(request), intent_id, "intent")
        return _json(200, json.dumps(intent).encode(), {"Request-Id": _id("req")})

    @router.post("/v1/refunds")
    async def post_refund(request: Request) -> Response:
        return await _idempotent(request, lambda p: create_refund(state(request), p))

    @router.get("/_sandbox/charges")
    async def get_charges(request: Request) -> list[Params]:
        return state(request).charges

    return router


def create_sandbox_app(
    *, prefix: str = "", webhook_url: str | None = None, webhook_secret: str | None = None
) -> FastAPI:
    """The sandbox as an ASGI app, every route under `prefix`."""
    if webhook_url and not webhook_secret:
        raise ValueError("webhook_url needs a webhook_secret: Stripe signs every delivery")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await app.state.sandbox.aclose()

    # No docs routes: they would sit outside `prefix`, where the gateway never routes.
    app = FastAPI(
        title="Stripe sandbox", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.sandbox = Sandbox(webhook_url=webhook_url, webhook_secret=webhook_secret)
    app.include_router(_router(prefix.rstrip("/")))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return _json(exc.status, json.dumps(exc.body()).encode(), {"Request-Id": _id("req")})

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = f"Unrecognized request URL ({request.method}: {request.url.path})."
        return await api_error(request, ApiError(exc.status_code, message))

    return app


class _SignalFreeServer(uvicorn.Server):
    """uvicorn that leaves signal handling to the process hosting it (pytest, the CLI)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class AppServer:
    """Serves any ASGI app with uvicorn inside the running event loop, on a port of its own."""

    def __init__(self, app: ASGIApp, *, host: str = "127.0.0.1", port: int | None = None) -> None:
        self._app, self.host, self.port = app, host, port
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """The base URL, e.g. http://127.0.0.1:PORT."""
        if self.port is None:
            raise RuntimeError("the server has no port until it starts")
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        """Serve in the background; returns once the port answers."""
        # Binding here, not in uvicorn: uvicorn answers a busy port with sys.exit.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port or 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self._app, log_level="warning", timeout_graceful_shutdown=5)
        self._server = server = _SignalFreeServer(config)
        self._task = task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        deadline = time.monotonic() + 10.0
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn stopped while starting")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.url} did not answer within 10s")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Shut down gracefully, running the app's shutdown."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
        self._server = self._task = None


class SandboxServer(AppServer):
    """The sandbox on 127.0.0.1 and a free port, for the SDK's `base_addresses={"api": url}`."""

    def __init__(
        self,
        *,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
    ) -> None:
        self._sandbox_app = create_sandbox_app(
            webhook_url=webhook_url, webhook_secret=webhook_secret
        )
        super().__init__(self._sandbox_app, host=host, port=port)

    @property
    def app(self) -> FastAPI:
        """The sandbox app being served."""
        return self._sandbox_app

    @property
    def sandbox(self) -> Sandbox:
        """The sandbox's state."""
        state: Sandbox = self._sandbox_app.state.sandbox
        return state
