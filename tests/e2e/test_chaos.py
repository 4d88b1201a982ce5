"""A rush on `ticketing up --workers 2` with its workers killed outright (SIGKILL) one after
another and every connection to PostgreSQL, NATS and Redis ended now and then: whatever each
was doing is cut off, mid-request, mid-batch, mid-publish. Afterwards nothing may be oversold,
lost or left inconsistent between the services."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from bench.flash_sale.chaos import watched_fds
from bench.flash_sale.config import Config
from bench.flash_sale.run import run
from rich.console import Console

from tests.conftest import PG_URL, Infra
from tests.support import TICKETING, clean_env
from ticketing.platform.embedded import listening_socket


async def test_a_rush_with_workers_killed_and_connections_dropped_loses_nothing(
    infra: Infra, namespace: str, settings_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    """The benchmark's own run and checks (bench/flash_sale), small, with a worker killed about
    every second of the rush, request and events workers in turn, every connection of the
    platform to PostgreSQL (by the server), NATS and Redis (by a relay in between) ended every
    second and a half, in the rush and while the expiry phase's orders fall due, and each
    events worker killed once meanwhile. (settings_kwargs: this test's
    databases and stream, dropped after it.)"""
    if not infra.postgres:
        pytest.skip("the flash sale runs on PostgreSQL, NATS and Redis")
    config = Config.quick(
        # Enough for a rush of several seconds, so that it sees both kinds of worker killed and
        # its connections dropped (400 tickets once sold in under the 1.5 s of a first drop).
        tickets=1200,
        rounds=1,
        ceiling=False,
        kill_every=1.0,
        drop_connections_every=1.5,
        postgres_url=PG_URL.replace("+asyncpg", ""),
        nats_url=infra.nats_url,
        redis_url=infra.redis_url,
        databases=f"{namespace}_",
        stream=settings_kwargs["nats_stream"],
        subject_prefix=settings_kwargs["nats_subject_prefix"],
        out_dir=tmp_path,
    )
    report = await run(config, Console(file=io.StringIO()))

    summary = report.summary()
    assert report.failed() == [], summary
    assert summary["workers_killed"]["request"] >= 1
    assert summary["workers_killed"]["events"] >= 1
    assert summary["connection_drops"] >= 1 and summary["connections_dropped"] > 0
    assert summary["nats_connections_cut"] > 0 and summary["redis_connections_cut"] > 0
    assert summary["consumers_caught_up"] is True
    # The unpaid orders expired though their jobs' worker was killed while they fell due, and
    # the connections of the rest were cut.
    assert summary["events_workers_killed_in_expiry"] >= 1
    assert summary["connection_drops_in_expiry"] >= 1
    assert summary["expiry_lateness_p99_ms"] is not None
    # Every order a buyer was told of was reserved, paid and completed: none was lost.
    assert summary["orders"] > 0
    assert summary["lost_events"] == 0
    assert summary["oversold"] == 0
    assert summary["errors_5xx"] == 0


def test_faults_are_made_only_on_a_platform_the_benchmark_started() -> None:
    args = ["bench", "flash-sale", "--url", "http://127.0.0.1:1", "--database-template",
            "postgresql+asyncpg://127.0.0.1/x_{service}", "--kill-every", "1"]  # fmt: skip
    result = subprocess.run(
        [*TICKETING, *args], env=clean_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "--kill-every and --drop-connections-every fault a platform it starts" in result.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="reads Linux's /proc fdinfo")
async def test_a_worker_counts_as_serving_once_its_loop_watches_its_listening_socket() -> None:
    """What the killer waits for before it kills a worker: a socket handed over listening is
    not yet served (the worker is still starting); once a server runs on it, it is."""
    with listening_socket("127.0.0.1", 0) as sock:
        assert sock.fileno() not in watched_fds(os.getpid())
        server = await asyncio.start_server(lambda _r, _w: None, sock=sock)
        try:
            served = server.sockets[0].fileno()
            assert served in watched_fds(os.getpid())
        finally:
            server.close()
            await server.wait_closed()
