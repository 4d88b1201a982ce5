"""The auth contract, route by route."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest

from ticketing.auth.app import create_app
from ticketing.auth.settings import AuthSettings
from ticketing.common.migrate import upgrade
from ticketing.platform.services import SERVICES

CREDS = {"email": "test@test.com", "password": "password"}


def errors(response: httpx.Response) -> list[dict[str, object]]:
    body = response.json()
    assert set(body) == {"errors"}
    return list(body["errors"])


def messages(response: httpx.Response) -> list[object]:
    return [e["message"] for e in errors(response)]


async def test_signup_returns_201_user_and_cookie(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/users/signup", json=CREDS)
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"id", "email"}
    assert body["email"] == "test@test.com"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("session=")
    lowered = cookie.lower()
    assert "httponly" in lowered
    assert "SameSite=Lax" in cookie  # as the contract spells it
    assert "path=/" in lowered
    assert "secure" not in lowered  # dev serves plain http


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"email": "not-an-email", "password": "password"}, "email", "Email must be valid"),
        ({"password": "password"}, "email", "Email must be valid"),
        ({"email": 5, "password": "password"}, "email", "Email must be valid"),
        ({"email": "a@b.com", "password": "p"}, "password",
         "Password must be between 4 and 20 characters"),
        ({"email": "a@b.com", "password": "p" * 21}, "password",
         "Password must be between 4 and 20 characters"),
        ({"email": "a@b.com"}, "password", "Password must be between 4 and 20 characters"),
    ],
)  # fmt: skip
async def test_signup_validation(
    client: httpx.AsyncClient, body: dict[str, object], field: str, message: str
) -> None:
    response = await client.post("/api/users/signup", json=body)
    assert response.status_code == 400
    assert {"message": message, "field": field} in errors(response)
    assert "set-cookie" not in response.headers


async def test_signup_with_both_fields_missing_names_both(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/users/signup", json={})
    assert response.status_code == 400
    assert {e["field"] for e in errors(response)} == {"email", "password"}


async def test_signup_email_in_use(client: httpx.AsyncClient) -> None:
    assert (await client.post("/api/users/signup", json=CREDS)).status_code == 201
    again = await client.post(
        "/api/users/signup", json={"email": "TEST@test.com", "password": "other1"}
    )
    assert again.status_code == 400
    assert messages(again) == ["Email in use"]


async def test_signin_with_valid_credentials(
    client: httpx.AsyncClient, make_client: Callable[[], httpx.AsyncClient]
) -> None:
    signed_up = (await client.post("/api/users/signup", json=CREDS)).json()
    async with make_client() as other:
        response = await other.post("/api/users/signin", json=CREDS)
    assert response.status_code == 200
    assert response.json() == signed_up
    assert response.headers["set-cookie"].startswith("session=")


async def test_signin_failures_share_one_message(client: httpx.AsyncClient) -> None:
    await client.post("/api/users/signup", json=CREDS)
    wrong = await client.post("/api/users/signin", json={**CREDS, "password": "wrong-one"})
    unknown = await client.post(
        "/api/users/signin", json={"email": "nobody@test.com", "password": "password"}
    )
    for response in (wrong, unknown):
        assert response.status_code == 400
        assert messages(response) == ["Invalid credentials"]
        assert "set-cookie" not in response.headers


async def test_signin_requires_a_password(client: httpx.AsyncClient) -> None:
    for body in ({"email": "a@b.com"}, {"email": "a@b.com", "password": ""}):
        response = await client.post("/api/users/signin", json=body)
        assert response.status_code == 400
        assert errors(response) == [{"message": "You must supply a password", "field": "password"}]


async def test_signin_requires_a_valid_email(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/users/signin", json={"email": "x", "password": "abcd"})
    assert response.status_code == 400
    assert errors(response) == [{"message": "Email must be valid", "field": "email"}]


async def test_signout_clears_the_cookie(client: httpx.AsyncClient) -> None:
    await client.post("/api/users/signup", json=CREDS)
    response = await client.post("/api/users/signout")
    assert response.status_code == 200
    assert response.json() == {}
    cookie = response.headers["set-cookie"].lower()
    assert cookie.startswith('session=""') or cookie.startswith("session=;")
    assert "max-age=0" in cookie
    current = await client.get("/api/users/currentuser")
    assert current.json() == {"currentUser": None}


async def test_currentuser_when_signed_in(client: httpx.AsyncClient) -> None:
    user = (await client.post("/api/users/signup", json=CREDS)).json()
    response = await client.get("/api/users/currentuser")
    assert response.status_code == 200
    current = response.json()["currentUser"]
    assert current["id"] == user["id"]
    assert current["email"] == user["email"]
    assert isinstance(current["iat"], int)


async def test_currentuser_is_null_not_401_without_or_with_a_bad_cookie(
    client: httpx.AsyncClient,
) -> None:
    assert (await client.get("/api/users/currentuser")).json() == {"currentUser": None}
    client.cookies.set("session", "not-a-jwt")
    response = await client.get("/api/users/currentuser")
    assert response.status_code == 200
    assert response.json() == {"currentUser": None}


async def test_a_token_signed_with_another_key_is_not_a_session(
    client: httpx.AsyncClient,
) -> None:
    from ticketing.common.auth import issue_token

    forged = issue_token(
        AuthSettings(jwt_key="someone-elses-key-that-is-long-enough-too"),
        user_id="x",
        email="evil@test.com",
    )
    client.cookies.set("session", forged)
    assert (await client.get("/api/users/currentuser")).json() == {"currentUser": None}


async def test_cookie_is_secure_in_production(auth_settings: AuthSettings) -> None:
    settings = auth_settings.model_copy(
        update={"env": "production", "jwt_key": "a-real-production-secret-of-40-characters"}
    )
    # Production does not create tables on start: the schema comes from the migrations.
    config = SERVICES["auth"].alembic_config(settings.service_database_url("auth"))
    await asyncio.to_thread(upgrade, config)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as c:
            response = await c.post("/api/users/signup", json=CREDS)
    assert response.status_code == 201
    assert "secure" in response.headers["set-cookie"].lower()


async def test_passwords_are_stored_as_argon2id(
    client: httpx.AsyncClient, auth_app: object
) -> None:
    from sqlalchemy import select

    from ticketing.auth.models import User

    await client.post("/api/users/signup", json=CREDS)
    async with auth_app.state.runtime.db.transaction() as session:  # type: ignore[attr-defined]
        stored = await session.scalar(select(User.password_hash))
    assert stored is not None
    assert stored.startswith("$argon2id$")
    assert "password" not in stored


async def test_signin_is_rate_limited_per_email(
    auth_settings: AuthSettings,
) -> None:
    settings = auth_settings.model_copy(update={"signin_limit_per_email": 3})
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            codes = [
                (await c.post("/api/users/signin", json={**CREDS, "password": "nope"})).status_code
                for _ in range(4)
            ]
            limited = await c.post("/api/users/signin", json=CREDS)
            other_email = await c.post(
                "/api/users/signin", json={"email": "else@test.com", "password": "nope"}
            )
    assert codes == [400, 400, 400, 429]
    assert limited.status_code == 429
    assert messages(limited) == ["Too many attempts; please wait a minute and try again"]
    # When to try again, for a client that retries by itself: by the end of the window.
    assert 1 <= int(limited.headers["retry-after"]) <= settings.rate_limit_window_seconds
    assert other_email.status_code == 400
    documented = app.openapi()["paths"]["/api/users/signin"]["post"]["responses"]["429"]
    assert "Retry-After" in documented["headers"]


async def test_guesses_from_others_do_not_lock_the_owner_out(
    auth_settings: AuthSettings,
) -> None:
    """The per-email limit counts each client's guesses apart, so someone else's wrong
    passwords do not keep the owner out; guesses spread over many clients stop at ten times
    that limit in all."""
    from ticketing.auth.routes import EVERY_CLIENT_FACTOR

    settings = auth_settings.model_copy(update={"signin_limit_per_email": 2})
    app = create_app(settings)

    def visitor(address: str) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=app, client=(address, 4000))
        return httpx.AsyncClient(transport=transport, base_url="http://testserver")

    async def sign_in(address: str, password: str) -> int:
        async with visitor(address) as c:
            body = {**CREDS, "password": password}
            return (await c.post("/api/users/signin", json=body)).status_code

    async with app.router.lifespan_context(app):
        async with visitor("10.0.0.1") as owner:
            assert (await owner.post("/api/users/signup", json=CREDS)).status_code == 201
        attacker = [await sign_in("10.6.6.6", "nope") for _ in range(3)]
        owner_after = await sign_in("10.0.0.1", CREDS["password"])
        spread = [await sign_in(f"10.7.0.{i}", "nope") for i in range(EVERY_CLIENT_FACTOR * 2)]
    assert attacker == [400, 400, 429]
    assert owner_after == 200
    # Every attempt counts, the refused ones too: the attacker's and these, 20 in all, then
    # every client is refused.
    assert spread.count(400) == 2 * EVERY_CLIENT_FACTOR - len(attacker)
    assert spread[-2:] == [429, 429]


async def test_signing_in_often_is_not_counted_against_the_limits(
    auth_settings: AuthSettings,
) -> None:
    """The limits are for guesses: a sign-in that works takes its attempt back."""
    settings = auth_settings.model_copy(
        update={"signin_limit_per_email": 3, "signin_limit_per_client": 3}
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            assert (await c.post("/api/users/signup", json=CREDS)).status_code == 201
            right = [(await c.post("/api/users/signin", json=CREDS)).status_code for _ in range(6)]
            wrong = {**CREDS, "password": "nope"}
            guesses = [
                (await c.post("/api/users/signin", json=wrong)).status_code for _ in range(4)
            ]
    assert right == [200] * 6
    assert guesses == [400, 400, 400, 429]


async def test_signin_is_rate_limited_per_client(auth_settings: AuthSettings) -> None:
    settings = auth_settings.model_copy(update={"signin_limit_per_client": 2})
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            codes = [
                (
                    await c.post(
                        "/api/users/signin", json={"email": f"u{i}@test.com", "password": "nope"}
                    )
                ).status_code
                for i in range(3)
            ]
    assert codes == [400, 400, 429]


async def test_refused_sign_ups_are_rate_limited_and_sign_ups_made_are_not(
    auth_settings: AuthSettings,
) -> None:
    """'Email in use', asked address after address, tells who has an account: refusals are
    counted per client (and per email); sign-ups that are made take their attempt back."""
    settings = auth_settings.model_copy(update={"signup_limit_per_client": 3})
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:

            async def sign_up(email: str) -> int:
                body = {"email": email, "password": "password"}
                return (await c.post("/api/users/signup", json=body)).status_code

            made = [await sign_up(f"new{i}@test.com") for i in range(5)]
            probes = [await sign_up(f"new{i}@test.com") for i in range(4)]
            limited = await c.post(
                "/api/users/signup", json={"email": "fresh@test.com", "password": "password"}
            )
    assert made == [201] * 5
    assert probes == [400, 400, 400, 429]
    assert limited.status_code == 429
    assert messages(limited) == ["Too many attempts; please wait a minute and try again"]


@pytest.mark.parametrize("password", [r"pa\u0000ss", r"pa\ud800ss"])
async def test_unstorable_passwords_are_400_not_500(
    client: httpx.AsyncClient, password: str
) -> None:
    # Raw JSON: a lone surrogate escape is valid JSON, but not text that can be stored.
    body = '{"email": "a@b.com", "password": "PASSWORD"}'.replace("PASSWORD", password).encode()
    headers = {"content-type": "application/json"}
    for route in ("signup", "signin"):
        response = await client.post(f"/api/users/{route}", content=body, headers=headers)
        assert response.status_code == 400, response.text


async def test_password_hashing_runs_at_most_a_few_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each Argon2 hash holds 64 MiB: a burst of sign-ups and sign-ins waits its turn instead
    of running all at once (the service would be killed for its memory)."""
    import threading

    from argon2 import PasswordHasher

    from ticketing.auth import service

    class Watched(PasswordHasher):
        running = peak = 0
        lock = threading.Lock()

        def _watch(self, work: Callable[[], object]) -> object:
            with self.lock:
                Watched.running += 1
                Watched.peak = max(Watched.peak, Watched.running)
            try:
                return work()
            finally:
                with self.lock:
                    Watched.running -= 1

        def hash(self, password: str | bytes, *, salt: bytes | None = None) -> str:
            return str(self._watch(lambda: super(Watched, self).hash(password, salt=salt)))

        def verify(self, hash: str | bytes, password: str | bytes) -> bool:
            return bool(self._watch(lambda: super(Watched, self).verify(hash, password)))

    watched = Watched()
    monkeypatch.setattr(service, "_hasher", lambda: watched)
    hashes = await asyncio.gather(*(service.hash_password(f"pass{i}") for i in range(8)))
    checks = [service.password_matches(h, f"pass{i}") for i, h in enumerate(hashes)]
    assert await asyncio.gather(*checks) == [True] * 8
    assert Watched.peak == service.HASHING_AT_ONCE
