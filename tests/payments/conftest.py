from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from tests.conftest import WEBHOOK_SECRET, Platform, new_user, payments_settings
from ticketing.common.events import OrderCreated
from ticketing.payments import service
from ticketing.platform.stripe_sandbox import SandboxServer

__all__ = ["WEBHOOK_SECRET", "seed_order"]


@pytest.fixture
async def shop(platform: Platform, sandbox: SandboxServer) -> Platform:
    await platform.start("payments", **payments_settings(sandbox))
    return platform


async def seed_order(
    platform: Platform,
    *,
    buyer: str | None = None,
    order_id: str | None = None,
    price: str = "20",
    expires_in: float = 900,
) -> OrderCreated:
    """An order in the payments replica, as order:created leaves it."""
    event = OrderCreated.model_validate(
        {
            "id": order_id or str(uuid.uuid4()),
            "version": 0,
            "status": "created",
            "userId": buyer or new_user(),
            "expiresAt": (datetime.now(UTC) + timedelta(seconds=expires_in)).isoformat(),
            "ticket": {"id": str(uuid.uuid4()), "price": Decimal(price)},
        }
    )
    async with platform.runtime("payments").db.transaction() as session:
        await service.orders_created(session, [event])
    return event
