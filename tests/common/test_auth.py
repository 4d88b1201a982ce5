"""Session tokens: a signature is checked once per token, the expiry on every use."""

from __future__ import annotations

import time

import jwt
import pytest

from ticketing.common import auth
from ticketing.common.auth import issue_token, verify_token
from ticketing.common.settings import Settings


@pytest.fixture
def settings() -> Settings:
    return Settings(jwt_key="k" * 32, jwt_ttl_seconds=60)


def test_a_valid_token_gives_its_claims(settings: Settings) -> None:
    claims = verify_token(settings, issue_token(settings, user_id="u-1", email="a@b.com"))
    assert claims is not None
    assert (claims.id, claims.email) == ("u-1", "a@b.com")


def test_a_token_verified_once_is_refused_once_it_expires(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = issue_token(settings, user_id="u-1", email="a@b.com")
    assert verify_token(settings, token) is not None
    later = time.time() + settings.jwt_ttl_seconds + 1
    monkeypatch.setattr(auth.time, "time", lambda: later)
    assert verify_token(settings, token) is None


def test_a_token_signed_with_another_key_is_refused(settings: Settings) -> None:
    other = Settings(jwt_key="o" * 32)
    token = issue_token(other, user_id="u-1", email="a@b.com")
    assert verify_token(other, token) is not None
    assert verify_token(settings, token) is None


@pytest.mark.parametrize(
    "claims",
    [
        {"id": "u-1", "email": "a@b.com", "iat": 1},  # no expiry
        {"id": "u-1", "email": "a@b.com", "iat": 1, "exp": "soon"},
        {"id": "u-1", "iat": 1, "exp": 4_000_000_000},  # no email
        {"id": "u-1", "email": "a@b.com", "iat": 1, "exp": float("inf")},  # JSON's Infinity
        {"id": "u-1", "email": "a@b.com", "iat": 1, "exp": float("-inf")},
        {"id": "u-1", "email": "a@b.com", "iat": 1, "exp": float("nan")},
    ],
)
def test_a_token_with_bad_claims_is_refused(settings: Settings, claims: dict[str, object]) -> None:
    token = jwt.encode(claims, settings.signing_key, algorithm="HS256")
    assert verify_token(settings, token) is None


def test_garbage_is_refused(settings: Settings) -> None:
    assert verify_token(settings, "not.a.token") is None
