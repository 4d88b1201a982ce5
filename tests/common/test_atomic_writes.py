"""Writes that carry their event without a transaction (`Database.autocommit`): a row or an
update and its outbox row land together or not at all, on PostgreSQL and on SQLite."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import Update, bindparam, select, update
from sqlalchemy.exc import IntegrityError

from tests.common.conftest import Effect
from ticketing.common.db import Database
from ticketing.common.events import TicketCreated
from ticketing.common.outbox import (
    OutboxEvent,
    add_event,
    insert_with_event,
    insert_with_event_on_driver,
    update_with_event,
    update_with_event_in,
)


def ticket(n: int) -> TicketCreated:
    return TicketCreated(id=f"ticket-{n}", version=0, title="Show", price=Decimal(10), user_id="u")


async def stored_event_ids(db: Database) -> list[str]:
    async with db.transaction() as session:
        return list(await session.scalars(select(OutboxEvent.event_id).order_by(OutboxEvent.seq)))


async def effect_keys(db: Database) -> list[str]:
    async with db.transaction() as session:
        return list(await session.scalars(select(Effect.key).order_by(Effect.id)))


async def test_a_row_and_its_event_are_written_together_or_not_at_all(db: Database) -> None:
    handed: list[str] = []
    db.on_commit(lambda rows: handed.extend(row["event_id"] for row in rows))
    row = {"id": 1, "key": "first", "replica": ""}
    async with db.autocommit() as connection:
        first = await insert_with_event(connection, Effect, row, ticket(1))
    with pytest.raises(IntegrityError):
        async with db.autocommit() as connection:
            # The same key: the row is refused, and its event with it.
            await insert_with_event(connection, Effect, {**row, "key": "second"}, ticket(2))
    assert await effect_keys(db) == ["first"]
    assert await stored_event_ids(db) == [first.id]
    assert handed == [first.id]  # to the relay, to publish at once


async def test_an_update_writes_its_event_only_when_it_changed_a_row(db: Database) -> None:
    async with db.autocommit() as connection:
        await insert_with_event(connection, Effect, {"id": 1, "key": "a", "replica": ""}, ticket(1))
    async with db.autocommit() as connection:
        renamed = await update_with_event(connection, _rename(), _renaming("a", "b"), ticket(2))
        # no longer "a": nothing changes
        stale = await update_with_event(connection, _rename(), _renaming("a", "c"), ticket(3))
    assert (renamed, stale) == (True, False)
    assert await effect_keys(db) == ["b"]
    assert len(await stored_event_ids(db)) == 2  # the insert's and the rename's


async def test_each_statement_commits_by_itself_on_postgresql(db: Database) -> None:
    if db.is_sqlite:
        pytest.skip("SQLite runs the block as one transaction: one writer, no round trips to save")
    async with db.autocommit() as connection:
        await insert_with_event(connection, Effect, {"id": 1, "key": "a", "replica": ""}, ticket(1))
        # Seen from another connection before the block ends: no transaction holds it back.
        assert await effect_keys(db) == ["a"]
        assert len(await stored_event_ids(db)) == 1


async def test_an_event_written_before_an_error_still_goes_to_the_relay_on_postgresql(
    db: Database,
) -> None:
    if db.is_sqlite:
        pytest.skip("SQLite runs the block as one transaction: an error rolls all of it back")
    handed: list[str] = []
    db.on_commit(lambda rows: handed.extend(row["event_id"] for row in rows))
    with pytest.raises(RuntimeError):
        async with db.autocommit() as connection:
            row = {"id": 1, "key": "a", "replica": ""}
            await insert_with_event(connection, Effect, row, ticket(1))
            raise RuntimeError("a later step of the use case failed")
    # The statement had committed: its event is stored, and handed to the relay.
    assert handed == await stored_event_ids(db)
    assert len(handed) == 1


async def test_an_update_in_a_session_hands_its_event_on_at_the_sessions_commit(
    db: Database,
) -> None:
    """update_with_event_in: the row goes to the hooks once the session commits, and none of a
    rolled-back one; nothing stays behind on the pooled connection for a later user."""
    async with db.autocommit() as connection:
        await insert_with_event(connection, Effect, {"id": 1, "key": "a", "replica": ""}, ticket(1))
    handed: list[str] = []
    db.on_commit(lambda rows: handed.extend(row["event_id"] for row in rows))
    with pytest.raises(RuntimeError):
        async with db.transaction() as session:
            await update_with_event_in(session, _rename(), _renaming("a", "b"), ticket(2))
            raise RuntimeError("a later handler of the batch failed")
    assert (handed, await effect_keys(db)) == ([], ["a"])
    async with db.transaction() as session:
        renamed = await update_with_event_in(session, _rename(), _renaming("a", "c"), ticket(3))
        stale = await update_with_event_in(session, _rename(), _renaming("a", "d"), ticket(4))
        assert handed == []  # not before the commit
    assert (renamed, stale) == (True, False)
    assert await effect_keys(db) == ["c"]
    assert handed == (await stored_event_ids(db))[1:]
    assert len(handed) == 1
    async with db.autocommit() as connection:  # the same pooled connection, a later user
        await insert_with_event(connection, Effect, {"id": 2, "key": "e", "replica": ""}, ticket(5))
    assert len(handed) == 2


def _rename() -> Update:
    return (
        update(Effect)
        .where(Effect.id == bindparam("effect_id"), Effect.key == bindparam("old"))
        .values(key=bindparam("new"))
    )


def _renaming(old: str, new: str) -> dict[str, object]:
    return {"effect_id": 1, "old": old, "new": new}


async def test_an_update_in_a_session_keeps_the_order_of_the_events_before_it(
    db: Database,
) -> None:
    """An event added earlier in the transaction (queued for the commit) is stored before the
    update's own, which is written at once: a sweep publishes in the order stored."""
    async with db.autocommit() as connection:
        await insert_with_event(connection, Effect, {"id": 1, "key": "a", "replica": ""}, ticket(1))
    handed: list[str] = []
    db.on_commit(lambda rows: handed.extend(row["event_id"] for row in rows))
    async with db.transaction() as session:
        earlier = add_event(session, ticket(2))
        await update_with_event_in(session, _rename(), _renaming("a", "b"), ticket(3))
    stored = (await stored_event_ids(db))[1:]
    assert handed == stored
    assert stored[0] == earlier.id
    assert len(stored) == 2


async def test_a_row_written_on_the_driver_and_its_event_land_together_or_not_at_all(
    db: Database,
) -> None:
    """The winning order's write: the same guarantees without SQLAlchemy's connection. A
    refused row (a unique index) comes as IntegrityError, writes and hands on nothing, and
    leaves the pool working."""
    handed: list[str] = []
    db.on_commit(lambda rows: handed.extend(row["event_id"] for row in rows))
    row = {"id": 1, "key": "first", "replica": ""}
    first = await insert_with_event_on_driver(db, Effect, row, ticket(1))
    with pytest.raises(IntegrityError):
        await insert_with_event_on_driver(db, Effect, {**row, "key": "second"}, ticket(2))
    assert await effect_keys(db) == ["first"]
    assert await stored_event_ids(db) == [first.id]
    assert handed == [first.id]
    second = await insert_with_event_on_driver(db, Effect, {**row, "id": 2}, ticket(3))
    assert await stored_event_ids(db) == [first.id, second.id]
    if not db.is_sqlite:  # on the driver a column left out is an error, not a NULL
        with pytest.raises(KeyError, match="replica"):
            await insert_with_event_on_driver(db, Effect, {"id": 3, "key": "third"}, ticket(4))
