"""Use cases of the auth service. They take a session and flush; the caller commits."""

from __future__ import annotations

import asyncio
import hashlib
import math
import secrets
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from ticketing.auth.models import MagicLink, RateLimitWindow, User
from ticketing.common.errors import BadRequest


@cache
def _hasher() -> PasswordHasher:
    return PasswordHasher()  # Argon2id with the library's current recommended parameters


@cache
def _decoy_hash() -> str:
    # Verifying against this when the email is unknown makes both failures take as long.
    return _hasher().hash(secrets.token_urlsafe(16))


# An Argon2id hash or check holds 64 MiB for about 0.2 s. asyncio's default pool runs up to
# 32 at once, some 2 GiB for a burst of sign-ins or sign-ups: enough to have the service
# killed for memory. At most this many run at once in a process; the rest wait their turn.
HASHING_AT_ONCE = 2
_T = TypeVar("_T")


@cache
def _hashing_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=HASHING_AT_ONCE, thread_name_prefix="argon2")


async def _hashing(work: Callable[[], _T]) -> _T:
    return await asyncio.get_running_loop().run_in_executor(_hashing_pool(), work)


async def hash_password(password: str) -> str:
    return await _hashing(lambda: _hasher().hash(password))


async def password_matches(stored: str | None, password: str) -> bool:
    """Whether `password` is the one `stored` was made from (as long to say no for None)."""

    def verify() -> bool:
        try:
            return _hasher().verify(stored or _decoy_hash(), password) and stored is not None
        except (VerificationError, InvalidHashError):
            return False

    return await _hashing(verify)


async def signup(session: AsyncSession, *, email: str, password: str) -> User:
    if await session.scalar(select(User.id).where(User.email == email)):
        raise BadRequest("Email in use", field="email")
    user = User(email=email, password_hash=await hash_password(password))
    session.add(user)
    try:
        await session.flush()
    except IntegrityError:
        raise BadRequest("Email in use", field="email") from None
    return user


async def signin(session: AsyncSession, *, email: str, password: str) -> User:
    user = await session.scalar(select(User).where(User.email == email))
    if not await password_matches(user.password_hash if user else None, password) or not user:
        raise BadRequest("Invalid credentials")
    return user


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def create_magic_link(session: AsyncSession, *, email: str, ttl_seconds: int) -> str:
    """Store a new single-use link for `email` and return its token (kept only as a hash)."""
    token = secrets.token_urlsafe(32)
    now = datetime.now(UTC)
    # Links that expired are of no use to anyone: without this the table only grows.
    await session.execute(delete(MagicLink).where(MagicLink.expires_at <= now))
    expires = now + timedelta(seconds=ttl_seconds)
    session.add(MagicLink(token_hash=hash_token(token), email=email, expires_at=expires))
    await session.flush()
    return token


async def magic_link_email(session: AsyncSession, *, token: str) -> str | None:
    """The address a link that still works is for, without spending it; else None."""
    return await session.scalar(
        select(MagicLink.email).where(
            MagicLink.token_hash == hash_token(token),
            MagicLink.used_at.is_(None),
            MagicLink.expires_at > datetime.now(UTC),
        )
    )


async def use_magic_link(session: AsyncSession, *, token: str) -> User:
    """Spend a link once and return its user, signing them up on first use."""
    now = datetime.now(UTC)
    # One conditional UPDATE makes the link single-use even when two clicks race.
    email = await session.scalar(
        update(MagicLink)
        .where(
            MagicLink.token_hash == hash_token(token),
            MagicLink.used_at.is_(None),
            MagicLink.expires_at > now,
        )
        .values(used_at=now)
        .returning(MagicLink.email)
    )
    if email is None:
        raise BadRequest("This sign-in link is invalid, used or expired", field="token")
    user = await session.scalar(select(User).where(User.email == email))
    if user is None:
        user = User(email=email, password_hash=None)
        session.add(user)
        await session.flush()
    return user


def current_window(window_seconds: int) -> int:
    """The fixed window of rate limiting that now falls in."""
    return int(datetime.now(UTC).timestamp()) // window_seconds


def seconds_left(window: int, window_seconds: int) -> int:
    """Whole seconds until `window` ends and a new one counts from zero (at least one)."""
    ends = (window + 1) * window_seconds
    return max(1, math.ceil(ends - datetime.now(UTC).timestamp()))


async def count_attempt(session: AsyncSession, *, key: str, window: int) -> int:
    """Count one attempt for `key` in `window`; returns the window's count."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = (
        insert(RateLimitWindow)
        .values(key=key, window=window, count=1)
        .on_conflict_do_update(
            index_elements=["key", "window"], set_={"count": RateLimitWindow.count + 1}
        )
        .returning(RateLimitWindow.count)
    )
    count = int((await session.execute(stmt)).scalar_one())
    await session.execute(delete(RateLimitWindow).where(RateLimitWindow.window < window - 1))
    return count


async def over_limit(session: AsyncSession, *, limits: dict[str, int], window: int) -> bool:
    """Count an attempt against each key; True when any key is over its limit."""
    over = False
    for key, limit in limits.items():
        over |= await count_attempt(session, key=key, window=window) > limit
    return over


async def uncount_attempt(session: AsyncSession, *, keys: Iterable[str], window: int) -> None:
    """Take back an attempt counted in `window` (one that turned out not to be a guess)."""
    await session.execute(
        update(RateLimitWindow)
        .where(RateLimitWindow.key.in_(list(keys)), RateLimitWindow.window == window)
        .values(count=RateLimitWindow.count - 1)
    )
