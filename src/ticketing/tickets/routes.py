"""HTTP routes of the tickets service: a thin adapter over service.py."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy.ext.asyncio import AsyncSession

from ticketing.common.app import RuntimeDep, SessionDep
from ticketing.common.auth import RequireUser
from ticketing.common.ids import path_id
from ticketing.common.openapi import error_responses
from ticketing.tickets import service
from ticketing.tickets.models import Ticket
from ticketing.tickets.schemas import TicketBody, TicketOut

router = APIRouter(prefix="/api/tickets", tags=["tickets"])


def _out(ticket: Ticket) -> TicketOut:
    return TicketOut.model_validate(ticket, from_attributes=True)


@router.post("", status_code=201, responses=error_responses(401))
async def create_ticket(body: TicketBody, user: RequireUser, session: SessionDep) -> TicketOut:
    ticket = await service.create_ticket(
        session, user_id=user.id, title=body.title, price=body.price
    )
    return _out(ticket)


@router.get("")
async def list_tickets(session: SessionDep) -> list[TicketOut]:
    return [_out(t) for t in await service.available_tickets(session)]


@router.get("/{ticket_id}", responses=error_responses(404))
async def show_ticket(ticket_id: str, session: SessionDep) -> TicketOut:
    return _out(await service.get_ticket(session, path_id(ticket_id, what="Ticket")))


@router.put("/{ticket_id}", responses=error_responses(401, 404, 409))
async def update_ticket(
    ticket_id: str, body: TicketBody, user: RequireUser, runtime: RuntimeDep
) -> TicketOut:
    tid = path_id(ticket_id, what="Ticket")

    async def work(session: AsyncSession) -> TicketOut:
        ticket = await service.update_ticket(
            session, ticket_id=tid, user_id=user.id, title=body.title, price=body.price
        )
        return _out(ticket)

    # A reservation landing between our read and write makes the write stale: run it again,
    # and the fresh read then refuses the edit with a clear message.
    return await runtime.db.retrying(work)
