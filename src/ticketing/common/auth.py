"""The session: a JWT in an HttpOnly cookie that every service verifies with the shared key."""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Annotated, Literal, cast

import jwt
from fastapi import Depends, FastAPI, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from ticketing.common.errors import NotAuthorized, domain_error_response, on_validation_error
from ticketing.common.settings import Settings

COOKIE_NAME = "session"
ALGORITHM = "HS256"


class UserClaims(BaseModel):
    """Who is signed in, as the session token says."""

    model_config = ConfigDict(frozen=True)  # shared by every request that carries the token

    id: str
    email: str
    iat: int


def issue_token(settings: Settings, *, user_id: str, email: str) -> str:
    now = int(time.time())
    claims = {"id": user_id, "email": email, "iat": now, "exp": now + settings.jwt_ttl_seconds}
    return jwt.encode(claims, settings.signing_key, algorithm=ALGORITHM)


def verify_token(settings: Settings, token: str) -> UserClaims | None:
    """The claims of a valid, unexpired token, or None for anything else."""
    verified = _verified(settings.signing_key, token)
    if verified is None or verified[1] <= time.time():
        return None
    return verified[0]


@lru_cache(maxsize=4096)
def _verified(key: str, token: str) -> tuple[UserClaims, int] | None:
    """A token's claims and expiry if its signature holds. A signature check gives the same
    answer every time, and a buyer sends the same token with every request: it is checked
    once; only the expiry is compared again on each use."""
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            options={"require": ["exp", "iat"], "verify_exp": False},
        )
        return UserClaims.model_validate(claims), int(claims["exp"])
    except (jwt.PyJWTError, ValueError, TypeError, OverflowError):  # Overflow: exp Infinity
        return None


# Starlette writes the attribute as given and types it in lower case; the contract spells it
# "SameSite=Lax", as browsers and RFC 6265 do.
_LAX = cast(Literal["lax"], "Lax")


def set_session_cookie(response: Response, settings: Settings, token: str) -> None:
    response.set_cookie(
        COOKIE_NAME,
        token,
        max_age=settings.jwt_ttl_seconds,
        path="/",
        httponly=True,
        samesite=_LAX,
        secure=not settings.is_dev,
    )


def clear_session_cookie(response: Response, settings: Settings) -> None:
    response.delete_cookie(
        COOKIE_NAME, path="/", httponly=True, samesite=_LAX, secure=not settings.is_dev
    )


def sign_in(response: Response, settings: Settings, *, user_id: str, email: str) -> None:
    """Start a session for this user on the response."""
    set_session_cookie(response, settings, issue_token(settings, user_id=user_id, email=email))


async def current_user(request: Request) -> UserClaims | None:
    """The signed-in user, or None; never an error."""
    token = request.cookies.get(COOKIE_NAME)
    if not token:
        return None
    settings: Settings = request.app.state.settings
    return verify_token(settings, token)


async def require_user(user: Annotated[UserClaims | None, Depends(current_user)]) -> UserClaims:
    """The signed-in user, or 401."""
    if user is None:
        raise NotAuthorized()
    return user


def requires_user(dependant: Dependant | None) -> bool:
    """Whether a route's dependencies, at any depth, include require_user."""
    pending = [dependant] if dependant is not None else []
    while pending:
        here = pending.pop()
        if here.call is require_user:
            return True
        pending.extend(here.dependencies)
    return False


async def _on_invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """Not signed in comes first: a route for signed-in users answers 401 to anyone without a
    session, whatever the body. FastAPI parses a JSON body before it runs the route's
    dependencies, so a body that does not parse would otherwise be answered 400."""
    route = request.scope.get("route")
    if requires_user(getattr(route, "dependant", None)) and await current_user(request) is None:
        return domain_error_response(NotAuthorized())
    return await on_validation_error(request, exc)


def install_session_first(app: FastAPI) -> None:
    """Answer 401 before 400 on a route for signed-in users: this handler of validation
    errors takes the place of install_error_handlers' (and hands it the rest), so it is
    installed after it."""
    app.add_exception_handler(RequestValidationError, _on_invalid_request)


CurrentUser = Annotated[UserClaims | None, Depends(current_user)]
RequireUser = Annotated[UserClaims, Depends(require_user)]
