"""The bus on a real NATS JetStream: publish, consume, redelivery, dedupe, queue semantics,
poison messages."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import pytest
from nats.js.api import ConsumerConfig
from nats.js.errors import NotFoundError
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from tests.common.conftest import Effect, count_effects, effects
from tests.support import consumer_settled, eventually, frozen, own_nats_bus
from ticketing.common.db import Database
from ticketing.common.events import (
    Envelope,
    OrderCreated,
    TicketCreated,
    TicketUpdated,
    subject_for,
)
from ticketing.common.messaging import (
    MAX_RETRY_LATER,
    RETRY_QUICKLY,
    Bus,
    Delivered,
    Listener,
    Publisher,
    RetryLater,
    consumer_filter,
    retry_delay,
)
from ticketing.common.outbox import DeadLetter, InboxEntry
from ticketing.common.settings import Settings
from ticketing.platform.embedded import free_port

MakeListener = Callable[..., Awaitable[Listener]]


def ticket(n: int = 1) -> TicketCreated:
    return TicketCreated(
        id=f"ticket-{n}", version=0, title="Concert", price=Decimal("20.5"), user_id="u1"
    )


def _effects(
    record: Callable[[AsyncSession, TicketCreated], None],
) -> Callable[[Listener], None]:
    """A ticket:created handler that records what it is given and leaves one effect row."""

    def setup(listener: Listener) -> None:
        @listener.on(TicketCreated)
        async def handle(session: AsyncSession, event: TicketCreated) -> None:
            record(session, event)
            session.add(Effect(key=event.id))

    return setup


async def test_published_events_are_consumed_as_typed_models(
    db: Database, publisher: Publisher, make_listener: MakeListener
) -> None:
    received: list[TicketCreated] = []
    await make_listener(_effects(lambda _session, event: received.append(event)))
    for n in range(3):
        await publisher.publish(Envelope.wrap(ticket(n)))
    await eventually(lambda: _at_least(db, 3))
    # Events about different tickets may be handled side by side, in any order.
    assert sorted(e.key for e in await effects(db)) == ["ticket-0", "ticket-1", "ticket-2"]
    first = next(e for e in received if e.id == "ticket-0")
    assert first == ticket(0)
    assert first.price == Decimal("20.5")


async def test_events_about_one_ticket_are_handled_in_their_order(
    db: Database, publisher: Publisher, make_listener: MakeListener
) -> None:
    """A batch is split into lanes by the ticket (or order) an event is about: one lane runs in
    stream order, whatever the other lanes do."""
    handled: list[tuple[str, int]] = []

    def setup(listener: Listener) -> None:
        @listener.on(TicketUpdated)
        async def handle(session: AsyncSession, event: TicketUpdated) -> None:
            handled.append((event.id, event.version))
            session.add(Effect(key=f"{event.id}-{event.version}"))

    await _publish_interleaved(publisher)
    await make_listener(setup)
    await eventually(lambda: _at_least(db, 10))
    for ticket_id in ("slow", "fast"):
        assert [v for t, v in handled if t == ticket_id] == [1, 2, 3, 4, 5]


async def test_a_batch_is_handled_in_one_transaction(
    db: Database, publisher: Publisher, make_listener: MakeListener
) -> None:
    sessions: list[AsyncSession] = []
    setup = _effects(lambda session, _event: sessions.append(session))

    for n in range(5):
        await publisher.publish(Envelope.wrap(ticket(n)))
    await make_listener(setup)  # started after publishing: the five arrive in one batch
    await eventually(lambda: _at_least(db, 5))
    assert len(sessions) == 5
    # SQLite has one writer, so each event gets a short transaction of its own there.
    assert len(set(map(id, sessions))) == (5 if db.is_sqlite else 1)


async def test_in_a_batch_each_handler_reads_what_others_committed_meanwhile(
    db: Database, publisher: Publisher, make_listener: MakeListener
) -> None:
    """As if each event had a transaction of its own: no row cached from an earlier handler."""
    if db.is_sqlite:
        pytest.skip("SQLite handles each event in a transaction of its own (one writer)")
    async with db.transaction() as session:
        shared = Effect(key="before", replica="shared")
        session.add(shared)
    seen: list[str] = []
    held: list[Effect] = []
    sessions: list[AsyncSession] = []

    def setup(listener: Listener) -> None:
        @listener.on(TicketCreated)
        async def handle(session: AsyncSession, event: TicketCreated) -> None:
            sessions.append(session)  # the objects: ids of two sessions may be the same
            row = await session.get(Effect, shared.id)
            assert row is not None
            seen.append(row.key)
            held.append(row)  # still referenced (as through a relationship): the session keeps it
            if event.id == "ticket-0":  # another process changes the row, and commits
                async with db.transaction() as elsewhere:
                    changed = await elsewhere.get(Effect, shared.id)
                    assert changed is not None
                    changed.key = "after"
            session.add(Effect(key=event.id))

    for n in range(2):
        await publisher.publish(Envelope.wrap(ticket(n)))
    await make_listener(setup)
    await eventually(lambda: _at_least(db, 3))
    assert seen == ["before", "after"]
    assert len(sessions) == 2 and sessions[0] is sessions[1]  # the batch's one transaction


async def test_one_failing_event_does_not_hold_back_its_batch(
    db: Database, publisher: Publisher, make_listener: MakeListener
) -> None:
    """The batch's transaction fails and is rolled back; each event then goes on its own, so
    the four good ones commit and only the bad one is retried."""
    calls: list[str] = []

    def setup(listener: Listener) -> None:
        @listener.on(TicketCreated)
        async def handle(session: AsyncSession, event: TicketCreated) -> None:
            calls.append(event.id)
            session.add(Effect(key=event.id))
            if event.id == "ticket-2":
                raise RuntimeError("this one always fails")

    for n in range(5):
        await publisher.publish(Envelope.wrap(ticket(n)))
    await make_listener(setup)
    await eventually(lambda: _at_least(db, 4))
    assert sorted(e.key for e in await effects(db)) == [f"ticket-{n}" for n in (0, 1, 3, 4)]
    if not db.is_sqlite:  # where a batch is first tried in one transaction
        assert calls[:3] == ["ticket-0", "ticket-1", "ticket-2"]  # given up at the third


async def test_one_slow_lane_does_not_hold_up_the_others(
    db: Database, publisher: Publisher, make_listener: MakeListener
) -> None:
    """After a batch failed together, its events go in lanes. The first "slow" event then waits
    inside its transaction until the "fast" lane has handled all five of its events: that only
    finishes if the lanes run at once."""
    if db.is_sqlite:
        pytest.skip("SQLite takes its one write lock per transaction: lanes serialize by design")
    fast_done = asyncio.Event()
    fast_seen: list[int] = []
    tried_together = False

    def setup(listener: Listener) -> None:
        @listener.on(TicketUpdated)
        async def handle(session: AsyncSession, event: TicketUpdated) -> None:
            nonlocal tried_together
            if event.id == "slow" and event.version == 1:
                if not tried_together:
                    tried_together = True
                    raise RuntimeError("fail the batch, so that it goes in lanes")
                await asyncio.wait_for(fast_done.wait(), timeout=20)
            elif event.id == "fast":
                fast_seen.append(event.version)
                if len(fast_seen) == 5:
                    fast_done.set()
            session.add(Effect(key=f"{event.id}-{event.version}"))

    await _publish_interleaved(publisher)
    await make_listener(setup)  # started after publishing: the ten arrive in one batch
    await eventually(lambda: _at_least(db, 10))
    assert fast_seen == [1, 2, 3, 4, 5]
    assert fast_done.is_set()


async def _publish_interleaved(publisher: Publisher) -> None:
    for version in range(1, 6):
        for ticket_id in ("slow", "fast"):
            await publisher.publish(Envelope.wrap(TicketUpdated(
                id=ticket_id, version=version, title="Gig", price=Decimal(10), user_id="u1"
            )))  # fmt: skip


async def _at_least(db: Database, n: int) -> bool:
    return await count_effects(db) >= n


async def test_a_failed_handler_is_rolled_back_and_redelivered(
    db: Database, bus: Bus, publisher: Publisher, make_listener: MakeListener
) -> None:
    calls = 0

    def setup(listener: Listener) -> None:
        @listener.on(TicketCreated)
        async def handle(session: AsyncSession, event: TicketCreated) -> None:
            nonlocal calls
            calls += 1
            session.add(Effect(key=event.id))
            await session.flush()
            if calls == 1:
                raise RuntimeError("the first attempt fails after writing")

    await make_listener(setup)
    await publisher.publish(Envelope.wrap(ticket()))
    await eventually(lambda: consumer_settled(bus, "probe"))
    await eventually(lambda: _at_least(db, 1))
    assert calls == 2
    assert len(await effects(db)) == 1  # the failed attempt's write was rolled back


async def test_jetstream_drops_a_second_publish_with_the_same_event_id(
    bus: Bus, publisher: Publisher
) -> None:
    envelope = Envelope.wrap(ticket())
    await publisher.publish(envelope)
    await publisher.publish(envelope)
    info = await bus.js.stream_info(bus.stream)
    assert info.state.messages == 1
    stored = await bus.js.get_msg(bus.stream, 1)
    assert stored.headers is not None
    assert stored.headers["Nats-Msg-Id"] == envelope.id


async def test_a_redelivered_event_has_no_second_effect(
    db: Database, bus: Bus, make_listener: MakeListener
) -> None:
    def setup(listener: Listener) -> None:
        @listener.on(TicketCreated)
        async def handle(session: AsyncSession, event: TicketCreated) -> None:
            session.add(Effect(key=event.id))

    listener = await make_listener(setup)
    body = Envelope.wrap(ticket()).model_dump_json().encode()
    # Published twice without the dedupe header: the inbox alone must keep the effect single.
    subject = subject_for("ticket:created", bus.prefix)
    await bus.js.publish(subject, body)
    await bus.js.publish(subject, body)
    await eventually(lambda: consumer_settled(bus, "probe"))
    assert len(await effects(db)) == 1
    assert listener.metrics is not None
    duplicates = listener.metrics.events_handled.labels(type="ticket:created", outcome="duplicate")
    assert duplicates._value.get() == 1


async def test_replicas_of_a_service_share_the_work_and_each_event_is_handled_once(
    db: Database, publisher: Publisher, make_listener: MakeListener
) -> None:
    def replica(name: str) -> Callable[[Listener], None]:
        def setup(listener: Listener) -> None:
            @listener.on(TicketCreated)
            async def handle(session: AsyncSession, event: TicketCreated) -> None:
                session.add(Effect(key=event.id, replica=name))
                await asyncio.sleep(0.005)  # stands for real work, so both replicas get a share

        return setup

    await make_listener(replica("a"), batch=1)
    await make_listener(replica("b"), batch=1)
    for n in range(40):
        await publisher.publish(Envelope.wrap(ticket(n)))
    await eventually(lambda: _at_least(db, 40))
    rows = await effects(db)
    assert sorted(r.key for r in rows) == sorted(f"ticket-{n}" for n in range(40))
    assert {r.replica for r in rows} == {"a", "b"}


async def test_a_poison_message_is_dead_lettered_after_bounded_attempts(
    db: Database, bus: Bus, publisher: Publisher, make_listener: MakeListener
) -> None:
    calls = 0

    def setup(listener: Listener) -> None:
        @listener.on(TicketCreated)
        async def handle(session: AsyncSession, event: TicketCreated) -> None:
            nonlocal calls
            calls += 1
            raise ValueError("this event can never be handled")

    await make_listener(setup, max_deliver=3)
    envelope = Envelope.wrap(ticket())
    await publisher.publish(envelope)
    letters = await eventually(lambda: _dead_letters(db))
    await eventually(lambda: consumer_settled(bus, "probe"))
    assert calls == 3
    assert len(letters) == 1
    assert letters[0].event_id == envelope.id
    assert letters[0].attempts == 3
    assert "this event can never be handled" in letters[0].error
    assert envelope.id in letters[0].body  # kept whole, for a person to replay
    assert (await bus.js.stream_info(bus.stream)).state.messages == 1  # still in the stream


async def test_a_part_that_does_not_answer_uses_up_no_attempts(
    db: Database, bus: Bus, publisher: Publisher, make_listener: MakeListener
) -> None:
    """A handler that cannot reach a part it needs (here a database where nothing listens)
    waits for it, however many tries that takes: its event is handled once the part is back,
    not dead-lettered after the attempts of a failure."""
    nowhere = Database(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/none")
    calls = 0

    def setup(listener: Listener) -> None:
        @listener.on(TicketCreated)
        async def handle(session: AsyncSession, event: TicketCreated) -> None:
            nonlocal calls
            calls += 1
            if calls <= 4:  # the part is down for the first four tries
                async with nowhere.engine.connect() as unreachable:
                    await unreachable.execute(select(1))
            session.add(Effect(key=event.id))

    try:
        await make_listener(setup, max_deliver=2)
        await publisher.publish(Envelope.wrap(ticket()))
        await eventually(lambda: _at_least(db, 1), within=20)
    finally:
        await nowhere.dispose()
    assert calls == 5
    assert await _dead_letters(db) == []


def test_an_event_that_must_wait_is_retried_soon_then_less_often_for_about_a_day() -> None:
    delays = [retry_delay(0.5, attempt) for attempt in range(1, MAX_RETRY_LATER)]
    assert delays[:RETRY_QUICKLY] == [0.5] * RETRY_QUICKLY
    assert delays[RETRY_QUICKLY : RETRY_QUICKLY + 3] == [1.0, 2.0, 4.0]
    assert max(delays) == delays[-1] == 30.0
    assert 20 * 3600 < sum(delays) < 30 * 3600


async def test_a_listener_makes_its_stream_and_consumer_again_when_nats_lost_them(
    db: Database, bus: Bus, publisher: Publisher, make_listener: MakeListener,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """NATS back without its store (the stream gone with the consumer): the events that come
    after reach the service again, without a restart."""
    from ticketing.common import messaging

    monkeypatch.setattr(messaging, "BIND_AGAIN_AFTER_SECONDS", 0.5)

    def setup(listener: Listener) -> None:
        @listener.on(TicketCreated)
        async def handle(session: AsyncSession, event: TicketCreated) -> None:
            session.add(Effect(key=event.id))

    await make_listener(setup)
    await bus.js.delete_stream(bus.stream)

    async def consumer_back() -> bool:
        try:
            await bus.js.consumer_info(bus.stream, "probe")
        except NotFoundError:
            return False
        return True

    await eventually(consumer_back, within=20)
    await publisher.publish(Envelope.wrap(ticket()))
    await eventually(lambda: _at_least(db, 1))


async def test_a_nats_that_stops_answering_is_noticed(
    settings: Settings, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frozen, not gone (no reset on the socket): missed pings tell, so that readiness says
    NATS is down and the client reconnects once it answers again."""
    from ticketing.common import messaging

    monkeypatch.setattr(messaging, "PING_INTERVAL_SECONDS", 1)
    async with own_nats_bus(settings, tmp_path / "nats") as (server, bus):
        with frozen(server):
            await eventually(lambda: not bus.is_connected, within=30)
        await eventually(lambda: bus.is_connected, within=30)


async def test_an_event_that_waited_still_has_all_its_tries_when_it_fails(
    db: Database, publisher: Publisher, make_listener: MakeListener
) -> None:
    """Waits (an early event, a part down) are deliveries but not failures: the first real
    failure after them is one of max_deliver, not the last."""
    calls = 0

    def setup(listener: Listener) -> None:
        @listener.on(TicketCreated)
        async def handle(session: AsyncSession, event: TicketCreated) -> None:
            nonlocal calls
            calls += 1
            if calls <= 4:
                raise RetryLater("not yet", delay=0.01)
            if calls == 5:
                raise ValueError("a failure, once")
            session.add(Effect(key=event.id))

    await make_listener(setup, max_deliver=2)
    await publisher.publish(Envelope.wrap(ticket()))
    await eventually(lambda: _at_least(db, 1), within=20)
    assert calls == 6
    assert await _dead_letters(db) == []


async def _dead_letters(db: Database) -> list[DeadLetter]:
    async with db.transaction() as session:
        return list(await session.scalars(select(DeadLetter)))


async def test_an_undecodable_message_is_dead_lettered_at_once(
    db: Database, bus: Bus, make_listener: MakeListener
) -> None:
    def setup(listener: Listener) -> None:
        listener.on(TicketCreated)(_never_called)

    await make_listener(setup)
    await bus.js.publish(subject_for("ticket:created", bus.prefix), b"{not json")
    letters = await eventually(lambda: _dead_letters(db))
    assert letters[0].attempts == 1
    assert letters[0].error.startswith("undecodable message")
    await eventually(lambda: consumer_settled(bus, "probe"))


async def _never_called(session: AsyncSession, event: TicketCreated) -> None:
    raise AssertionError("no handler should run for this message")


async def test_retry_later_naks_and_the_event_comes_back(
    db: Database, bus: Bus, publisher: Publisher, make_listener: MakeListener
) -> None:
    calls = 0

    def setup(listener: Listener) -> None:
        @listener.on(TicketCreated)
        async def handle(session: AsyncSession, event: TicketCreated) -> None:
            nonlocal calls
            calls += 1
            if calls < 3:
                raise RetryLater("waiting for an earlier version", delay=0.1)
            session.add(Effect(key=event.id))

    await make_listener(setup)
    await publisher.publish(Envelope.wrap(ticket()))
    await eventually(lambda: _at_least(db, 1))
    await eventually(lambda: consumer_settled(bus, "probe"))
    assert calls == 3
    assert await _dead_letters(db) == []


async def test_a_handler_outside_the_database_runs_without_a_transaction_or_inbox_entry(
    db: Database, bus: Bus, publisher: Publisher, make_listener: MakeListener
) -> None:
    seen: list[tuple[str, int]] = []

    def setup(listener: Listener) -> None:
        @listener.on_outside_db(TicketCreated)
        async def handle(event: TicketCreated) -> None:
            seen.append((event.id, len(seen)))
            if event.id == "ticket-2" and len(seen) < 3:
                raise RetryLater("the job queue is not connected yet", delay=0.1)

    await make_listener(setup)
    for n in (1, 2):
        await publisher.publish(Envelope.wrap(ticket(n)))
    await eventually(lambda: consumer_settled(bus, "probe"))
    assert sorted({event_id for event_id, _ in seen}) == ["ticket-1", "ticket-2"]
    assert [event_id for event_id, _ in seen].count("ticket-2") >= 2  # retried, then done
    assert await _inbox_entries(db) == 0
    assert await _dead_letters(db) == []


async def test_a_failing_handler_outside_the_database_is_dead_lettered_in_the_end(
    db: Database, bus: Bus, publisher: Publisher, make_listener: MakeListener
) -> None:
    def setup(listener: Listener) -> None:
        @listener.on_outside_db(TicketCreated)
        async def handle(event: TicketCreated) -> None:
            raise RuntimeError("the queue refused it")

    await make_listener(setup, max_deliver=2)
    await publisher.publish(Envelope.wrap(ticket()))
    dead = await eventually(lambda: _dead_letters(db), within=15)
    assert [(d.event_id is not None, d.attempts) for d in dead] == [(True, 2)]


async def _inbox_entries(db: Database) -> int:
    async with db.transaction() as session:
        return int(await session.scalar(select(func.count()).select_from(InboxEntry)) or 0)


async def test_events_without_a_handler_are_acked_and_ignored(
    db: Database, bus: Bus, publisher: Publisher, make_listener: MakeListener
) -> None:
    def setup(listener: Listener) -> None:
        # Two families: the consumer is sent every event, and ignores ticket:updated.
        listener.on(TicketCreated)(_never_called)
        listener.on(OrderCreated)(_never_called)

    await make_listener(setup)
    update = TicketUpdated(
        id="t1", version=1, title="Concert", price=Decimal(10), user_id="u1", order_id=None
    )
    await publisher.publish(Envelope.wrap(update))
    await eventually(lambda: consumer_settled(bus, "probe"))
    info = await bus.js.consumer_info(bus.stream, "probe")
    assert info.delivered.consumer_seq == 1
    assert await effects(db) == []


def _order_created(order_id: str) -> OrderCreated:
    return OrderCreated.model_validate(
        {"id": order_id, "version": 0, "status": "created", "userId": "u1",
         "expiresAt": "2030-01-01T00:00:00Z", "ticket": {"id": "t1", "price": 10}}
    )  # fmt: skip


async def test_a_consumer_is_sent_only_the_events_it_may_handle(
    db: Database, bus: Bus, publisher: Publisher, make_listener: MakeListener
) -> None:
    def setup(listener: Listener) -> None:
        @listener.on(OrderCreated)
        async def handle(session: AsyncSession, event: OrderCreated) -> None:
            session.add(Effect(key=event.id))

    # A consumer left by an earlier version, sent everything: it is narrowed in place.
    await bus.js.add_consumer(
        bus.stream, ConsumerConfig(durable_name="probe", filter_subject=f"{bus.prefix}.>")
    )
    await make_listener(setup)
    await publisher.publish(Envelope.wrap(ticket(1)))
    await publisher.publish(Envelope.wrap(_order_created("o1")))
    await eventually(lambda: _at_least(db, 1))
    await eventually(lambda: consumer_settled(bus, "probe"))
    info = await bus.js.consumer_info(bus.stream, "probe")
    assert info.config.filter_subject == subject_for("order:created", bus.prefix)
    assert info.delivered.consumer_seq == 1  # ticket:created never reached it
    assert [e.key for e in await effects(db)] == ["o1"]


async def test_a_listener_does_not_start_without_its_stream(
    bus: Bus, make_listener: MakeListener
) -> None:
    await bus.js.delete_stream(bus.stream)
    with pytest.raises(NotFoundError):
        await make_listener(lambda listener: listener.on(TicketCreated)(_never_called))


def test_a_consumer_filter_is_the_narrowest_that_covers_its_events() -> None:
    assert consumer_filter("p", ["order:created"]) == "p.order.created"
    assert consumer_filter("p", ["order:created", "order:cancelled"]) == "p.order.>"
    assert consumer_filter("p", ["order:created", "ticket:created"]) == "p.>"


async def test_a_handler_integrity_error_is_retried_not_marked_handled(
    db: Database, bus: Bus, publisher: Publisher, make_listener: MakeListener
) -> None:
    from sqlalchemy.exc import IntegrityError

    calls = 0

    def setup(listener: Listener) -> None:
        @listener.on(TicketCreated)
        async def handle(session: AsyncSession, event: TicketCreated) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise IntegrityError("INSERT ...", {}, Exception("a constraint of the handler"))
            session.add(Effect(key=event.id))

    await make_listener(setup)
    await publisher.publish(Envelope.wrap(ticket()))
    await eventually(lambda: _at_least(db, 1))
    await eventually(lambda: consumer_settled(bus, "probe"))
    assert calls == 2
    assert len(await effects(db)) == 1


def test_the_replica_version_rule() -> None:
    from ticketing.common.messaging import is_next_version

    assert is_next_version(3, 4, what="ticket t")
    assert not is_next_version(3, 3, what="ticket t")  # a duplicate: dropped
    assert not is_next_version(3, 1, what="ticket t")  # stale: dropped
    for local, incoming in ((3, 5), (None, 0)):  # early, or before the creation: wait
        with pytest.raises(RetryLater, match="ticket t"):
            is_next_version(local, incoming, what="ticket t")


async def test_a_batch_handler_takes_the_events_of_its_type_that_come_in_a_row(
    db: Database, publisher: Publisher, make_listener: MakeListener
) -> None:
    """Stream order kept: an event of another type between them starts a new run; each event
    comes with its request's correlation id; one alone comes as a list of one."""
    calls: list[list[tuple[str, str | None]]] = []

    def setup(listener: Listener) -> None:
        @listener.on_batch(TicketCreated)
        async def created(session: AsyncSession, events: list[Delivered[TicketCreated]]) -> None:
            calls.append([(d.event.id, d.correlation) for d in events])
            session.add_all(Effect(key=d.event.id) for d in events)

        @listener.on(TicketUpdated)
        async def updated(session: AsyncSession, event: TicketUpdated) -> None:
            calls.append([(f"updated-{event.id}", None)])
            session.add(Effect(key=f"updated-{event.id}"))

    for n in range(3):
        await _publish_correlated(publisher, Envelope.wrap(ticket(n)), f"req-{n}")
    await publisher.publish(Envelope.wrap(_updated(ticket(0))))
    await _publish_correlated(publisher, Envelope.wrap(ticket(3)), "req-3")
    await make_listener(setup)  # started after publishing: the five arrive in one batch
    await eventually(lambda: _at_least(db, 5))
    if db.is_sqlite:  # one event per transaction there: each alone
        assert sorted(calls) == sorted([[(f"ticket-{n}", f"req-{n}")] for n in range(4)] + [
            [("updated-ticket-0", None)]
        ])  # fmt: skip
        return
    assert calls == [
        [("ticket-0", "req-0"), ("ticket-1", "req-1"), ("ticket-2", "req-2")],
        [("updated-ticket-0", None)],
        [("ticket-3", "req-3")],
    ]


async def test_a_batch_handler_outside_the_database_takes_its_events_at_once(
    db: Database, bus: Bus, publisher: Publisher, make_listener: MakeListener
) -> None:
    """In one call, then acked; a call that fails leaves each event to be handled on its own."""
    calls: list[list[str]] = []

    def setup(listener: Listener) -> None:
        @listener.on_batch_outside_db(TicketCreated)
        async def handle(events: list[Delivered[TicketCreated]]) -> None:
            calls.append([d.event.id for d in events])
            if len(events) > 1 and len(calls) > 1:
                raise RuntimeError("the queue refused the second batch")

    for n in range(3):
        await publisher.publish(Envelope.wrap(ticket(n)))
    listener = await make_listener(setup)
    await eventually(lambda: consumer_settled(bus, "probe"))
    await listener.stop()
    for n in range(3, 5):
        await publisher.publish(Envelope.wrap(ticket(n)))
    await make_listener(setup)
    await eventually(lambda: consumer_settled(bus, "probe"))
    assert calls[0] == ["ticket-0", "ticket-1", "ticket-2"]
    assert calls[1] == ["ticket-3", "ticket-4"]
    assert sorted(calls[2:]) == [["ticket-3"], ["ticket-4"]]
    assert await _inbox_entries(db) == 0


def _updated(created: TicketCreated) -> TicketUpdated:
    return TicketUpdated(**{**created.model_dump(), "version": 1, "order_id": None})


async def _publish_correlated(publisher: Publisher, envelope: Envelope, correlation: str) -> None:
    body = envelope.model_dump_json().encode()
    await publisher.publish_raw(envelope.type, envelope.id, body, correlation=correlation)


async def test_a_batch_handler_that_fails_leaves_the_whole_batch_to_one_at_a_time(
    db: Database, publisher: Publisher, make_listener: MakeListener
) -> None:
    """A run that raises rolls back every run of its transaction (an effect of the run before
    it too); then each event goes alone, as a list of one."""
    if db.is_sqlite:
        pytest.skip("SQLite handles each event in a transaction of its own (one writer)")
    calls: list[list[str]] = []

    def setup(listener: Listener) -> None:
        @listener.on(TicketUpdated)
        async def updated(session: AsyncSession, event: TicketUpdated) -> None:
            session.add(Effect(key=f"updated-{event.id}"))

        @listener.on_batch(TicketCreated)
        async def created(session: AsyncSession, events: list[Delivered[TicketCreated]]) -> None:
            calls.append([d.event.id for d in events])
            if len(events) > 1:
                raise RetryLater("not as a batch")
            session.add(Effect(key=events[0].event.id))

    await publisher.publish(Envelope.wrap(_updated(ticket(9))))
    for n in range(3):
        await publisher.publish(Envelope.wrap(ticket(n)))
    await make_listener(setup)  # started after publishing: the four arrive in one batch
    await eventually(lambda: _at_least(db, 4))
    assert calls[0] == ["ticket-0", "ticket-1", "ticket-2"]
    assert sorted(calls[1:]) == [["ticket-0"], ["ticket-1"], ["ticket-2"]]
    assert sorted(e.key for e in await effects(db)) == [
        "ticket-0", "ticket-1", "ticket-2", "updated-ticket-9"
    ]  # fmt: skip


async def test_a_nats_that_does_not_answer_is_said_in_one_line_per_try(
    settings_kwargs: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """At start (or while the server is away) every failed try is one warning naming the server
    (not its credentials), not nats-py's traceback; the start gives up with a clear error."""
    port = free_port()
    nowhere = f"nats://watcher:hunter2@127.0.0.1:{port}"
    settings = Settings(
        **{**settings_kwargs, "nats_url": nowhere, "nats_connect_timeout_seconds": 1.5}
    )
    with caplog.at_level(logging.WARNING), pytest.raises(ConnectionError, match="did not answer"):
        await Bus(settings).connect()
    tries = [r for r in caplog.records if f"nats://127.0.0.1:{port}" in r.getMessage()]
    assert tries
    assert all(r.levelno == logging.WARNING and "\n" not in r.getMessage() for r in tries)
    assert not any(r.exc_info for r in caplog.records)
    assert not any("hunter2" in r.getMessage() for r in caplog.records)  # no credentials
