"""HTTP routes of the orders service: a thin adapter over service.py."""

from __future__ import annotations

from collections.abc import Awaitable

from fastapi import APIRouter, Request, Response

from ticketing.common.app import Runtime, RuntimeDep, SessionDep, runtime_of
from ticketing.common.auth import RequireUser
from ticketing.common.errors import NotFound, ServiceUnavailable
from ticketing.common.ids import path_id
from ticketing.common.openapi import error_responses
from ticketing.orders import service
from ticketing.orders.models import Order
from ticketing.orders.schemas import OrderBody, OrderOut

router = APIRouter(prefix="/api/orders", tags=["orders"])
PUBLISH_WAIT_SECONDS = 0.5


def _out(order: Order | service.PlacedOrder) -> OrderOut:
    return OrderOut.model_validate(order, from_attributes=True)


@router.post("", status_code=201, responses=error_responses(401, 404))
async def create_order(body: OrderBody, user: RequireUser, request: Request) -> OrderOut:
    # Most attempts are answered by OrderAttempts (hot_path.py), with what this route answers.
    return await place(runtime_of(request), user_id=user.id, ticket_id=body.ticketId)


async def place(runtime: Runtime, *, user_id: str, ticket_id: str) -> OrderOut:
    def create() -> Awaitable[service.PlacedOrder]:
        return service.create_order(
            runtime.db,
            user_id=user_id,
            ticket_id=ticket_id,
            ttl_seconds=runtime.settings.order_ttl_seconds,
        )

    try:
        order = await create()
    except NotFound:
        # Unknown, or its ticket:created still on the way (this service's events behind, as
        # while its events worker restarts): a 503 while they are, not the 404 of no ticket.
        if not await runtime.listener.has_received("ticket:created"):
            raise ServiceUnavailable(
                "Orders are catching up; please try again in a moment"
            ) from None
        order = await create()  # it has come in: being handled, perhaps
    # The 201 leaves once order:created is handed to NATS, by this task: waiting for the relay's
    # task to wake, and then for JetStream's ack, through a loop busy with a rush's other
    # attempts, made the winners the slowest of them. The relay awaits the ack and marks the
    # row; a sweep sends again what was not acked.
    await runtime.relay.send_committed()
    return _out(order)


@router.get("", responses=error_responses(401))
async def list_orders(user: RequireUser, session: SessionDep) -> list[OrderOut]:
    return [_out(o) for o in await service.my_orders(session, user_id=user.id)]


@router.get("/{order_id}", responses=error_responses(401, 404))
async def show_order(order_id: str, user: RequireUser, session: SessionDep) -> OrderOut:
    oid = path_id(order_id, what="Order")
    return _out(await service.get_order(session, order_id=oid, user_id=user.id))


@router.delete("/{order_id}", status_code=204, responses=error_responses(400, 401, 404))
async def cancel_order(order_id: str, user: RequireUser, runtime: RuntimeDep) -> Response:
    oid = path_id(order_id, what="Order")
    # Another cancellation, an expiry or a payment may change the order at the same moment:
    # the version check then refuses this write, and the order is read again and decided anew.
    await runtime.db.retrying(
        lambda session: service.cancel_order(session, order_id=oid, user_id=user.id)
    )
    # As an order's 201: the 204 leaves once order:cancelled is on the stream, so that the
    # services told of it next (a payment sent at once) can see it has been handled.
    await runtime.relay.caught_up(within=PUBLISH_WAIT_SECONDS)
    return Response(status_code=204)
