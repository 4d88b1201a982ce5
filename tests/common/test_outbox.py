"""The transactional outbox and its relay, on a real database and JetStream."""

from __future__ import annotations

import asyncio
import logging
from decimal import Decimal
from pathlib import Path

import pytest
from nats.js.errors import APIError, NoStreamResponseError
from sqlalchemy import event, select

from tests.support import eventually, frozen, own_nats_bus, stream_envelopes
from ticketing.common import messaging
from ticketing.common.db import Database
from ticketing.common.events import Envelope, TicketCreated
from ticketing.common.messaging import Bus, Publisher
from ticketing.common.metrics import ServiceMetrics
from ticketing.common.outbox import OutboxEvent, OutboxRelay, add_event
from ticketing.common.settings import Settings
from ticketing.platform.embedded import free_port


def ticket(n: int) -> TicketCreated:
    return TicketCreated(id=f"ticket-{n}", version=0, title="Show", price=Decimal(10), user_id="u")


async def pending_rows(db: Database) -> list[OutboxEvent]:
    async with db.transaction() as session:
        return list(
            await session.scalars(select(OutboxEvent).where(OutboxEvent.published_at.is_(None)))
        )


@pytest.fixture
async def relays(db: Database, publisher: Publisher) -> asyncio.Queue[OutboxRelay]:
    made: asyncio.Queue[OutboxRelay] = asyncio.Queue()
    yield made
    while not made.empty():
        await made.get_nowait().stop()


def start_relay(
    db: Database,
    publisher: Publisher,
    made: asyncio.Queue[OutboxRelay],
    *,
    sweep: float = 0.2,
    sweeps: bool = True,
    batch_size: int = 200,
) -> OutboxRelay:
    relay = OutboxRelay(db, publisher, sweep_seconds=sweep, batch_size=batch_size)
    relay.start(sweep=sweeps)
    made.put_nowait(relay)
    return relay


async def test_an_event_committed_while_the_relay_is_down_goes_out_when_it_starts(
    db: Database, bus: Bus, publisher: Publisher, relays: asyncio.Queue[OutboxRelay]
) -> None:
    async with db.transaction() as session:
        envelope = add_event(session, ticket(1))
    assert await stream_envelopes(bus) == []
    start_relay(db, publisher, relays)
    published = await eventually(lambda: stream_envelopes(bus))
    assert [e.id for e in published] == [envelope.id]
    assert published[0].payload() == ticket(1)
    await eventually(lambda: _none_pending(db))


async def _none_pending(db: Database) -> bool:
    return await pending_rows(db) == []


async def test_nothing_is_published_for_a_rolled_back_transaction(
    db: Database, bus: Bus, publisher: Publisher, relays: asyncio.Queue[OutboxRelay]
) -> None:
    start_relay(db, publisher, relays)
    with pytest.raises(RuntimeError):
        async with db.transaction() as session:
            add_event(session, ticket(1))
            raise RuntimeError("the use case failed")
    async with db.transaction() as session:
        marker = add_event(session, ticket(2))
    published = await eventually(lambda: stream_envelopes(bus))
    assert [e.id for e in published] == [marker.id]


async def test_a_commit_is_published_at_once_and_then_marked(
    db: Database, bus: Bus, publisher: Publisher, relays: asyncio.Queue[OutboxRelay]
) -> None:
    # No sweep at all: only the commit's own hand-over can make this event go out.
    start_relay(db, publisher, relays, sweeps=False)
    async with db.transaction() as session:
        envelope = add_event(session, ticket(1))
    published = await eventually(lambda: stream_envelopes(bus), within=5)
    assert [e.id for e in published] == [envelope.id]
    await eventually(lambda: _none_pending(db))


async def test_a_round_larger_than_a_batch_goes_out_in_batches_and_is_marked(
    db: Database, bus: Bus, publisher: Publisher, relays: asyncio.Queue[OutboxRelay]
) -> None:
    # A statement's parameters are bounded: ten rows of one commit go three at a time.
    start_relay(db, publisher, relays, sweeps=False, batch_size=3)
    async with db.transaction() as session:
        ids = [add_event(session, ticket(n)).id for n in range(10)]
    published = await eventually(lambda: _all_published(bus, 10))
    assert [e.id for e in published] == ids
    await eventually(lambda: _none_pending(db))


async def test_commits_published_close_together_are_marked_together(
    db: Database, bus: Bus, publisher: Publisher, relays: asyncio.Queue[OutboxRelay]
) -> None:
    """A mark is a commit of its own: rows that go out within moments share one."""
    marks: list[str] = []

    def count_marks(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if statement.lstrip().upper().startswith("UPDATE OUTBOX"):
            marks.append(statement)

    event.listen(db.engine.sync_engine, "before_cursor_execute", count_marks)
    # A gathering far longer than ten commits take, so that the count does not hang on speed.
    relay = OutboxRelay(db, publisher, sweep_seconds=0.2, mark_gather_seconds=2.0)
    relay.start(sweep=False)
    relays.put_nowait(relay)

    async def commit(n: int) -> None:
        async with db.transaction() as session:
            add_event(session, ticket(n))

    for n in range(10):  # one after another, each published as it commits
        await commit(n)
    await eventually(lambda: _all_published(bus, 10))
    await eventually(lambda: _none_pending(db))
    assert len(marks) == 1  # one per commit without the gathering


async def test_caught_up_returns_once_this_process_commits_are_on_the_stream(
    db: Database, bus: Bus, publisher: Publisher, relays: asyncio.Queue[OutboxRelay]
) -> None:
    relay = start_relay(db, publisher, relays, sweeps=False)
    async with db.transaction() as session:
        envelope = add_event(session, ticket(1))
    assert await relay.caught_up(within=10)
    assert [e.id for e in await stream_envelopes(bus)] == [envelope.id]


async def test_caught_up_holds_no_one_when_the_publish_fails_or_no_relay_runs(
    db: Database, settings: Settings, relays: asyncio.Queue[OutboxRelay]
) -> None:
    stopped = OutboxRelay(db, Publisher(Bus(settings)))
    assert await stopped.caught_up(within=10)  # never started: a sweep will send
    relay = start_relay(db, Publisher(Bus(settings)), relays, sweeps=False)  # never connected
    async with db.transaction() as session:
        envelope = add_event(session, ticket(1))
    assert await relay.caught_up(within=10)  # the publish failed: left to a sweep
    assert [row.event_id for row in await pending_rows(db)] == [envelope.id]


async def test_caught_up_holds_no_one_once_the_relay_stops(
    db: Database, settings: Settings, relays: asyncio.Queue[OutboxRelay], tmp_path: Path
) -> None:
    """Rows still queued when the relay stops are the sweep's: a waiter is let go at once,
    even while a publish waits on a NATS that does not answer (a server stopped mid-way)."""
    async with own_nats_bus(settings, tmp_path / "nats") as (server, stalled):
        relay = start_relay(db, Publisher(stalled), relays, sweeps=False)
        with frozen(server):
            async with db.transaction() as session:
                add_event(session, ticket(1))
            waiter = asyncio.create_task(relay.caught_up(within=60))
            await relay.stop()
            assert await asyncio.wait_for(waiter, 10)


async def test_an_event_whose_prompt_publish_fails_goes_out_on_a_sweep(
    db: Database, bus: Bus, settings: Settings, relays: asyncio.Queue[OutboxRelay]
) -> None:
    """NATS unreachable as the commit lands: the row stays pending, nothing is lost."""
    start_relay(db, Publisher(Bus(settings)), relays, sweeps=False)  # a bus never connected
    async with db.transaction() as session:
        envelope = add_event(session, ticket(1))
    assert [row.event_id for row in await pending_rows(db)] == [envelope.id]
    start_relay(db, Publisher(bus), relays)
    published = await eventually(lambda: stream_envelopes(bus))
    assert [e.id for e in published] == [envelope.id]
    await eventually(lambda: _none_pending(db))


async def test_events_are_published_in_commit_order(
    db: Database, bus: Bus, publisher: Publisher, relays: asyncio.Queue[OutboxRelay]
) -> None:
    ids = []
    for n in range(25):
        async with db.transaction() as session:
            ids.append(add_event(session, ticket(n)).id)
    start_relay(db, publisher, relays)
    published = await eventually(lambda: _all_published(bus, 25))
    assert [e.id for e in published] == ids


async def test_events_of_one_transaction_keep_the_order_they_were_added_in(
    db: Database, bus: Bus, publisher: Publisher, relays: asyncio.Queue[OutboxRelay]
) -> None:
    # The rows are written as the transaction commits, around whatever else it flushed.
    async with db.transaction() as session:
        ids = [add_event(session, ticket(n)).id for n in range(5)]
        await session.flush()
        ids += [add_event(session, ticket(n)).id for n in range(5, 8)]
    start_relay(db, publisher, relays)
    published = await eventually(lambda: _all_published(bus, 8))
    assert [e.id for e in published] == ids


async def _all_published(bus: Bus, n: int) -> list[Envelope]:
    found = await stream_envelopes(bus)
    return found if len(found) >= n else []


async def test_a_row_published_before_a_crash_is_not_published_twice(
    db: Database, bus: Bus, publisher: Publisher, relays: asyncio.Queue[OutboxRelay]
) -> None:
    async with db.transaction() as session:
        envelope = add_event(session, ticket(1))
    # The process died after the publish and before marking the row: it is still pending.
    await publisher.publish(envelope)
    start_relay(db, publisher, relays)
    await eventually(lambda: _none_pending(db))
    assert [e.id for e in await stream_envelopes(bus)] == [envelope.id]


async def test_two_processes_relaying_one_database_leave_each_event_once_on_the_stream(
    db: Database, bus: Bus, publisher: Publisher, relays: asyncio.Queue[OutboxRelay]
) -> None:
    """Each process publishes its own commits and sweeps for what is left: a row the other
    process also took goes out twice at most, and the stream (its Nats-Msg-Id) keeps one."""
    other = Database(str(db.engine.url.render_as_string(hide_password=False)))
    try:
        start_relay(db, publisher, relays)
        start_relay(other, publisher, relays)
        ids = []
        for n in range(30):
            async with (db if n % 2 else other).transaction() as session:
                ids.append(add_event(session, ticket(n)).id)
        published = await eventually(lambda: _all_published(bus, 30))
        await eventually(lambda: _none_pending(db))
        assert sorted(e.id for e in published) == sorted(ids)
        assert len(await stream_envelopes(bus)) == 30
    finally:
        while not relays.empty():  # stopped before the database they use is disposed
            await relays.get_nowait().stop()
        await other.dispose()


async def test_prune_forgets_only_old_published_events_and_old_inbox_entries(
    db: Database, publisher: Publisher
) -> None:
    from datetime import timedelta

    from ticketing.common.db import utcnow
    from ticketing.common.outbox import InboxEntry

    old = utcnow() - timedelta(days=8)
    async with db.transaction() as session:
        for n, published in enumerate((old, None, utcnow())):
            session.add(
                OutboxEvent(
                    event_id=f"00000000-0000-0000-0000-00000000000{n}",
                    type="ticket:created",
                    body="{}",
                    created_at=old,
                    published_at=published,
                )
            )
        session.add(InboxEntry(consumer="probe", event_id="old", handled_at=old))
        session.add(InboxEntry(consumer="probe", event_id="new"))
    await OutboxRelay(db, publisher).prune()
    async with db.transaction() as session:
        kept = sorted(e for e in await session.scalars(select(OutboxEvent.event_id)))
        handled = list(await session.scalars(select(InboxEntry.event_id)))
    # The old published row goes; an old row never published stays: it still has to go out.
    assert kept == [
        "00000000-0000-0000-0000-000000000001",
        "00000000-0000-0000-0000-000000000002",
    ]
    assert handled == ["new"]


async def test_a_process_that_only_serves_requests_publishes_its_own_commits(
    db: Database, bus: Bus, settings: Settings, relays: asyncio.Queue[OutboxRelay]
) -> None:
    """`ticketing up --workers N`: a request worker sweeps nothing, but publishes what its own
    commits wrote at once. The events worker's sweep is a minute away here."""
    start_relay(db, Publisher(bus), relays, sweep=60)
    requests_db = Database(settings.service_database_url("probe"))  # the other process's pool
    requests_bus = Bus(settings)
    await requests_bus.connect()
    try:
        start_relay(requests_db, Publisher(requests_bus), relays, sweeps=False)
        sent = []
        for n in (7, 8):
            async with requests_db.transaction() as session:
                sent.append(add_event(session, ticket(n)).id)
            published = await eventually(lambda: _published(bus, len(sent)))
        assert [e.id for e in published] == sent
        await eventually(lambda: _none_pending(db))
    finally:
        while not relays.empty():  # before the pool and bus they use go
            await relays.get_nowait().stop()
        await requests_bus.close()
        await requests_db.dispose()


async def _published(bus: Bus, count: int) -> list[Envelope] | None:
    envelopes = await stream_envelopes(bus)
    return envelopes if len(envelopes) >= count else None


async def test_a_sweep_with_its_database_away_warns_without_a_traceback(
    publisher: Publisher, relays: asyncio.Queue[OutboxRelay], caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL restarting is an outage to wait out, not a bug: a warning each sweep, no
    ERROR with a traceback (those stay for what is wrong in the work itself)."""
    away = Database(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/none")
    relay = OutboxRelay(away, publisher, sweep_seconds=0.05, metrics=ServiceMetrics("probe"))
    relay.start(sweep=True)  # with metrics, as a service's: its housekeeping reads the backlog
    relays.put_nowait(relay)
    with caplog.at_level(logging.WARNING, logger="ticketing.common.outbox"):
        await eventually(lambda: "a part is not answering" in caplog.text)
        await eventually(lambda: "housekeeping failed" in caplog.text)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    await away.dispose()


async def test_a_sweep_that_fails_on_the_work_itself_logs_the_error(
    settings: Settings,
    publisher: Publisher,
    relays: asyncio.Queue[OutboxRelay],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A database that answers but has no outbox table (never created): that is a bug."""
    bare = Database(settings.service_database_url("bare"))
    with caplog.at_level(logging.WARNING, logger="ticketing.common.outbox"):
        start_relay(bare, publisher, relays, sweep=0.05)
        await eventually(lambda: "outbox relay failed" in caplog.text)
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)
    await bare.dispose()


async def test_send_committed_sends_in_the_callers_task_and_the_relay_marks_it(
    db: Database, bus: Bus, publisher: Publisher, relays: asyncio.Queue[OutboxRelay]
) -> None:
    """A rush's winner sends its own order:created before its 201, without a turn of the
    loop for the relay's task nor a wait for JetStream's ack; the relay marks it once acked."""
    relay = start_relay(db, publisher, relays, sweeps=False)
    async with db.transaction() as session:
        envelope = add_event(session, ticket(1))
    await relay.send_committed()
    await relay.send_committed()  # nothing left to send: a no-op
    published = await eventually(lambda: stream_envelopes(bus))
    assert [e.id for e in published] == [envelope.id]
    await eventually(lambda: _none_pending(db))


async def test_a_send_never_acked_is_left_to_the_sweep(
    db: Database,
    bus: Bus,
    settings: Settings,
    relays: asyncio.Queue[OutboxRelay],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """NATS stops answering after the send: the ack is given up after its deadline (its
    client slot freed), the row stays pending, and a sweep publishes it."""
    monkeypatch.setattr(messaging, "PUBLISH_ACK_SECONDS", 0.3)
    async with own_nats_bus(settings, tmp_path / "nats") as (server, stalled):
        relay = start_relay(db, Publisher(stalled), relays, sweeps=False)
        with frozen(server):
            async with db.transaction() as session:
                envelope = add_event(session, ticket(1))
            await relay.send_committed()
            assert await relay.caught_up(within=10)  # given up: the sweep's now
        assert [row.event_id for row in await pending_rows(db)] == [envelope.id]
    start_relay(db, Publisher(bus), relays)
    published = await eventually(lambda: stream_envelopes(bus))
    assert [e.id for e in published] == [envelope.id]
    await eventually(lambda: _none_pending(db))


async def test_a_send_that_jetstream_refuses_raises_its_error(bus: Bus, settings: Settings) -> None:
    """The ack of a send carries JetStream's refusal (here: the stream is not the one the
    publish expects), as nats-py's own publish raises it."""
    other = Bus(settings.model_copy(update={"nats_stream": f"{settings.nats_stream}-other"}))
    other.nc, other._js = bus.nc, bus.js  # the same connection, expecting another stream
    ack = await Publisher(other).send_raw("ticket:created", "id-1", b"{}")
    with pytest.raises(APIError):
        await Publisher.acked([ack])


async def test_a_send_no_stream_takes_raises_no_stream_response(
    bus: Bus, settings: Settings
) -> None:
    other = Bus(settings.model_copy(update={"nats_subject_prefix": "nobody-listens"}))
    other.nc, other._js = bus.nc, bus.js
    ack = await Publisher(other).send_raw("ticket:created", "id-1", b"{}")
    with pytest.raises(NoStreamResponseError):
        await Publisher.acked([ack])
