"""`ticketing up --workers N`: every process's pools together fit PostgreSQL's connections."""

from __future__ import annotations

import logging
import os

import pytest

from ticketing.platform.embedded import listening_socket
from ticketing.platform.services import SERVICES
from ticketing.platform.workers import (
    CONNECTION_BUDGET,
    EVENT_ROLES,
    EVENT_WORKERS,
    EVENTS_POOL_SIZE,
    FOLLOW_UP_NICENESS,
    MIN_POOL_SIZE,
    REQUESTS,
    RESERVATION_NICENESS,
    START_AGAIN_LONGEST_SECONDS,
    START_AGAIN_SECONDS,
    Restarts,
    WorkerPool,
    change_priority,
    pool_sizes,
)

NOBODY = 65534  # the unprivileged user of Debian and most Linux systems


@pytest.mark.parametrize("request_workers", [1, 2, 3, 4])
def test_all_pools_at_their_fullest_stay_within_the_budget(request_workers: int) -> None:
    roles = [*EVENT_ROLES, *[REQUESTS] * request_workers]
    sizes = pool_sizes(roles)
    # A request worker fills the pools of the services it serves requests of.
    pools = [(role, spec) for role in roles for spec in SERVICES.values() if spec.has_database
             and (role.runs(spec.name) if role.listens else spec.prefix is not None)]  # fmt: skip
    assert sum(sizes[role] for role, _spec in pools) <= CONNECTION_BUDGET
    assert all(sizes[role] == EVENTS_POOL_SIZE for role in EVENT_ROLES)
    # The request workers share what the events workers leave: more each when they are fewer.
    assert sizes[REQUESTS] > EVENTS_POOL_SIZE if request_workers <= 2 else sizes[REQUESTS] >= 2


def test_two_request_workers_get_more_connections_than_the_events_workers_need() -> None:
    """A rush sends a request worker some eight to eleven attempts at once: with four
    connections a service, attempts queued for one; with two workers each now has nine."""
    assert pool_sizes([*EVENT_ROLES, REQUESTS, REQUESTS])[REQUESTS] == 9


def test_too_many_processes_for_the_budget_are_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="ticketing.platform.workers"):
        assert pool_sizes([*EVENT_ROLES, *[REQUESTS] * 30])[REQUESTS] == MIN_POOL_SIZE
    assert "TICKETING_DB_POOL_SIZE" in caplog.text


def test_the_reservation_comes_first_and_the_follow_up_of_a_sale_last() -> None:
    """The reservation's worker slightly above the request workers (at the default priority);
    the worker of orders, payments and expiration (replicas, jobs) far below them."""
    (reservation,) = [role for role in EVENT_ROLES if role.runs("tickets")]
    (follow_up,) = [role for role in EVENT_ROLES if not role.runs("tickets")]
    assert reservation.niceness < REQUESTS.niceness == 0 < follow_up.niceness
    assert {"orders", "payments", "expiration"} <= follow_up.services


def _niceness_after_change(niceness: int, *, as_nobody: bool = False) -> int:
    """The niceness a forked child runs at once change_priority(niceness) has run in it (not
    in this process, whose priority would stay changed), with the privileges of nobody if
    asked."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer, then exit at once, whatever happens
        status = 1
        try:
            if as_nobody:
                os.setuid(NOBODY)
            os.write(write, str(change_priority(niceness)).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    try:
        _, status = os.waitpid(pid, 0)
        answer = os.read(read, 16)
    finally:
        os.close(read)
    assert os.waitstatus_to_exitcode(status) == 0
    return int(answer)


def test_a_worker_runs_at_a_lower_priority_when_asked() -> None:
    assert _niceness_after_change(FOLLOW_UP_NICENESS) == FOLLOW_UP_NICENESS


def test_a_worker_runs_at_a_higher_priority_where_it_may_raise_it() -> None:
    privileged = os.geteuid() == 0
    expected = RESERVATION_NICENESS if privileged else 0
    assert _niceness_after_change(RESERVATION_NICENESS) == expected


def test_a_worker_without_the_privilege_to_raise_its_priority_runs_at_the_default() -> None:
    """Not an error: on most laptops nobody may raise a priority."""
    # As root, the child drops to nobody; otherwise it is unprivileged already.
    as_nobody = os.geteuid() == 0
    assert _niceness_after_change(RESERVATION_NICENESS, as_nobody=as_nobody) == 0


def test_every_service_has_its_events_handled_by_exactly_one_events_worker() -> None:
    for name in SERVICES:
        assert sum(role.runs(name) for role in EVENT_ROLES) == 1, name
    assert all(role.listens for role in EVENT_ROLES)
    assert len(EVENT_ROLES) == EVENT_WORKERS


def test_the_reservation_path_has_a_worker_of_its_own() -> None:
    (reservation,) = [role for role in EVENT_ROLES if role.runs("tickets")]
    assert reservation.services == {"tickets"}


def test_a_worker_that_did_not_fail_its_start_up_is_replaced_at_once() -> None:
    """A crash once serving, or a kill (even while starting)."""
    restarts = Restarts()
    assert restarts.died(start_failed=False, now=100.0) == 0.0
    assert restarts.start_now(100.0)
    assert not restarts.start_now(100.0)  # one replacement per death


def test_start_ups_that_fail_in_a_row_are_tried_again_ever_more_slowly() -> None:
    """The database away, say: a new process every second or two would burn a core on its
    imports and log a traceback each time. The pause doubles, up to the longest, and any
    other death (the worker served, or was killed) makes the next failure start from the
    first pause."""
    restarts, now, pauses = Restarts(), 0.0, []
    for _ in range(8):
        pause = restarts.died(start_failed=True, now=now)
        assert not restarts.start_now(now + pause / 2)
        now += pause
        assert restarts.start_now(now)
        pauses.append(pause)
    assert pauses[:3] == [START_AGAIN_SECONDS, 2 * START_AGAIN_SECONDS, 4 * START_AGAIN_SECONDS]
    assert max(pauses) == pauses[-1] == START_AGAIN_LONGEST_SECONDS
    assert restarts.died(start_failed=False, now=now) == 0.0
    assert restarts.died(start_failed=True, now=now) == START_AGAIN_SECONDS


def test_each_request_worker_listens_on_a_socket_of_its_own_kept_for_its_replacement() -> None:
    with listening_socket("127.0.0.1", 0, shared=True) as sock:
        pool = WorkerPool(sock, "info", {})
        first, second = pool._request_socket(2), pool._request_socket(3)
        try:
            assert first is sock and second is not sock
            assert second.getsockname() == sock.getsockname()
            assert pool._request_socket(3) is second  # a replacement takes over its backlog
        finally:
            pool.stop()
        assert second.fileno() == -1 and sock.fileno() != -1  # the pool's own are closed
