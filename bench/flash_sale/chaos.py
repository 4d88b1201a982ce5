"""Faults during the rush: workers killed outright (`--kill-every`), every connection of the
platform to PostgreSQL, NATS and Redis ended (`--drop-connections-every`). What they cut off must
still add up: the checks after the run are the same; only the answers a fault explains (none
at all from a killed worker, a 503 from a dropped connection) are expected."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from itertools import cycle
from typing import Self

import asyncpg
import nats
import psutil

from bench.flash_sale.relay import Relay

ROLES = ("request", "events")
POLL_SECONDS = 0.1
DRAIN_POLL_SECONDS = 0.2


@dataclass(frozen=True)
class Kill:
    at: float  # seconds since the killer was first entered
    role: str
    pid: int


@dataclass
class ChaosResult:
    kills: list[Kill]  # in the rush
    drops: list[int]  # in the rush: each time, how many of the platform's database connections
    drained: bool  # every consumer caught up after the rush
    expiry_kills: list[Kill] = field(default_factory=list)  # while the unpaid orders fell due
    cut: dict[str, int] = field(default_factory=dict)  # in the rush: NATS, Redis connections
    expiry_drops: list[int] = field(default_factory=list)  # while the unpaid orders fell due
    expiry_cut: dict[str, int] = field(default_factory=dict)

    @property
    def killing(self) -> bool:
        return bool(self.kills or self.expiry_kills)

    def by_role(self) -> dict[str, int]:
        return {role: sum(1 for k in self.kills if k.role == role) for role in ROLES}


class Fault:
    """A fault made by a task of its own while the block runs (`_run`, until cancelled)."""

    _task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        raise NotImplementedError


class WorkerKiller(Fault):
    """While entered, SIGKILL one worker process of a `ticketing up` every `every` seconds or
    so: request and events workers in turn, the longest-running of the role each time. The
    platform's supervisor starts a new one in its place; nothing tells the platform first."""

    def __init__(
        self,
        supervisor_pid: int,
        port: int,
        every: float,
        roles: tuple[str, ...] = ROLES,
        most: int | None = None,
    ) -> None:
        self.supervisor_pid = supervisor_pid
        self.port = port
        self.every = every
        self.roles = roles  # whose workers are killed, in turn
        self.most = most  # kills in all, if bounded
        self.kills: list[Kill] = []
        self._began = 0.0
        # The most workers of each role seen serving at once: the role with none missing.
        self._full = dict.fromkeys(ROLES, 0)

    async def __aenter__(self) -> Self:
        self._began = self._began or time.monotonic()  # once: a kill's time is since the first
        return await super().__aenter__()

    async def _run(self) -> None:
        for role in cycle(self.roles):
            if self.most is not None and len(self.kills) >= self.most:
                return
            victim = await self._next_victim(role)
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
                self.kills.append(Kill(time.monotonic() - self._began, role, victim))

    async def _next_victim(self, role: str) -> int:
        """The oldest worker of the role, once every worker of the role serves and has run for
        `every` seconds: a kill never lands on a replacement still starting, nor leaves a role
        with none. (The other role's may still be starting.)"""
        while True:
            await asyncio.sleep(min(self.every, POLL_SECONDS))
            serving = self._workers()[role]
            self._full[role] = max(self._full[role], len(serving))
            now = time.time()
            if not serving or len(serving) < self._full[role]:
                continue
            if any(now - w.create_time() < self.every for w in serving):
                continue
            oldest: int = min(serving, key=lambda w: w.create_time()).pid
            return oldest

    def _workers(self) -> dict[str, list[psutil.Process]]:
        """The supervisor's worker processes that serve, by role, in one look: request workers
        on the platform's port, events workers on a socket of their own. Each is handed its
        listening socket by the supervisor, so it listens from its first moment; it serves once
        its event loop watches that socket (after its start-up), and until then it is still
        starting: neither. Killed before that, again and again (a start-up that waits out a
        dropped database connection takes longer than `every`), no worker would ever serve."""
        workers: dict[str, list[psutil.Process]] = {role: [] for role in ROLES}
        try:
            children = psutil.Process(self.supervisor_pid).children()
        except psutil.NoSuchProcess:
            return workers
        for child in children:
            try:
                if "--multiprocessing-fork" not in child.cmdline():
                    continue
                listening = {c.fd: c.laddr.port for c in child.net_connections("tcp")
                             if c.status == psutil.CONN_LISTEN}  # fmt: skip
                watched = watched_fds(child.pid)
            except (psutil.Error, OSError):
                continue  # gone meanwhile
            ports = {port for fd, port in listening.items() if fd in watched}
            if ports:
                workers["request" if self.port in ports else "events"].append(child)
        return workers


def watched_fds(pid: int) -> set[int]:
    """The file descriptors the epoll instances of process `pid` watch (Linux's fdinfo)."""
    watched: set[int] = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:[eventpoll]":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                watched |= {int(line.split()[1]) for line in info if line.startswith("tfd:")}
    return watched


class ConnectionDropper(Fault):
    """While entered, every `every` seconds end every connection to the platform's databases
    from the server's side (pg_terminate_backend), as a restart or a failover of PostgreSQL
    does to its clients, and resets every connection through the relays it is given (the
    platform's to NATS and Redis), as a restart of those servers does."""

    def __init__(
        self, admin_dsn: str, databases: str, every: float, relays: dict[str, Relay]
    ) -> None:
        self.admin_dsn = admin_dsn
        self.databases = databases  # the prefix of the platform's databases' names
        self.every = every
        self.relays = relays
        self.drops: list[int] = []
        self.cut = dict.fromkeys(relays, 0)

    async def _run(self) -> None:
        admin = await asyncpg.connect(self.admin_dsn)
        try:
            while True:
                await asyncio.sleep(self.every)
                ended = await admin.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE left(datname, length($1)) = $1 AND datname <> $2"
                    " AND pid <> pg_backend_pid()",
                    self.databases,
                    f"{self.databases}ceiling",  # the ceiling's is not the platform's
                )
                self.drops.append(int(ended))
                for name, relay in self.relays.items():
                    self.cut[name] += relay.cut()
        finally:
            await admin.close()


class Chaos:
    """The faults of a run's rush, each optional, entered together."""

    def __init__(self, killer: WorkerKiller | None, dropper: ConnectionDropper | None) -> None:
        self.killer = killer
        self.dropper = dropper

    async def __aenter__(self) -> Self:
        for fault in (self.killer, self.dropper):
            if fault is not None:
                await fault.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for fault in (self.killer, self.dropper):
            if fault is not None:
                await fault.__aexit__(*exc)

    def describe(self) -> str:
        faults = []
        if self.killer:
            faults.append(f"a worker killed every {self.killer.every}s")
        if self.dropper:
            faults.append(f"connections dropped every {self.dropper.every}s")
        return ", ".join(faults)

    @property
    def kills(self) -> list[Kill]:
        return self.killer.kills if self.killer else []

    @property
    def drops(self) -> list[int]:
        return self.dropper.drops if self.dropper else []

    @property
    def cut(self) -> dict[str, int]:
        return dict(self.dropper.cut) if self.dropper else {}

    def result(self, drained: bool) -> ChaosResult:
        return ChaosResult(self.kills, self.drops, drained, cut=self.cut)


async def drained(nats_url: str, stream: str, within: float) -> bool:
    """Until every consumer of the stream has been sent all it has and acked it (what a killed
    worker had fetched comes back after the consumer's ack wait); False on the deadline."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            consumers = await js.consumers_info(stream)
            if all(c.num_pending == 0 and c.num_ack_pending == 0 for c in consumers):
                return True
            await asyncio.sleep(DRAIN_POLL_SECONDS)
        return False
    finally:
        await nc.close()
