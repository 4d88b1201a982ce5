"""The processes a run measures, their CPU, and the fresh databases, stream and queue they use."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import asyncpg
import nats
import psutil
import redis.asyncio as aioredis
from nats.js.errors import NotFoundError

from bench.flash_sale.config import Config
from bench.flash_sale.relay import Relay
from ticketing.platform.embedded import free_port

SERVICES_WITH_DB = ("auth", "tickets", "orders", "expiration", "payments")
START_TIMEOUT_SECONDS = 90.0
# With workers killed during the rush, what a killed events worker had fetched and not acked
# comes back this soon (the platform's default is 30 s): the run waits for it, then checks.
CHAOS_ACK_WAIT_SECONDS = 5


def database_url(config: Config, name: str, driver: str = "postgresql") -> str:
    return f"{config.postgres_url.replace('postgresql', driver, 1)}/{config.databases}{name}"


def service_dsn(config: Config, service: str) -> str:
    """A plain asyncpg DSN of a service's database, for the checks."""
    if config.database_template:
        url = config.database_template.replace("{service}", service)
        return url.replace("postgresql+asyncpg", "postgresql", 1)
    return database_url(config, service)


async def reset(config: Config) -> None:
    """Drop what an earlier run left: databases, the stream, the expiration queue. A running
    platform given by URL is left alone: only the ceiling's database is new."""
    managed = config.url is None
    admin = await asyncpg.connect(f"{config.postgres_url}/postgres")
    try:
        for name in (*(SERVICES_WITH_DB if managed else ()), "ceiling"):
            await admin.execute(f'DROP DATABASE IF EXISTS "{config.databases}{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{config.databases}ceiling"')
    finally:
        await admin.close()
    if managed:
        await _reset_bus_and_queue(config)


async def _reset_bus_and_queue(config: Config) -> None:
    nc = await nats.connect(config.nats_url)
    try:
        with contextlib.suppress(NotFoundError):
            await nc.jetstream().delete_stream(config.stream)
    finally:
        await nc.close()
    queue = aioredis.from_url(config.redis_url)  # type: ignore[no-untyped-call]
    try:
        await queue.delete(f"{config.subject_prefix}:expiration")
    finally:
        await queue.aclose()


class Child:
    """A server started for the run, in its own process group."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = log.open("ab")
        self.process = subprocess.Popen(
            args, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.log = log

    def alive(self) -> bool:
        return self.process.poll() is None

    def cpu(self) -> dict[int, float]:
        return tree_cpu(self.process.pid)

    def stop(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


def tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of a process and all its descendants, by pid."""
    try:
        root = psutil.Process(pid)
        found = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    return _cpu_of(found)


def named_cpu(*names: str) -> Callable[[], dict[int, float]]:
    def sample() -> dict[int, float]:
        return _cpu_of(p for p in psutil.process_iter(["name"]) if p.info["name"] in names)

    return sample


def _cpu_of(processes: object) -> dict[int, float]:
    out: dict[int, float] = {}
    for process in processes:  # type: ignore[attr-defined]
        try:
            times = process.cpu_times()
            out[process.pid] = times.user + times.system + times.children_user
        except psutil.Error:
            continue
    return out


class CpuMeter:
    """CPU seconds per part between two moments, from per-process samples."""

    def __init__(self) -> None:
        self.parts: dict[str, Callable[[], dict[int, float]]] = {
            "load generator": lambda: _cpu_of([psutil.Process()]),
            "PostgreSQL": named_cpu("postgres"),
            "NATS": named_cpu("nats-server"),
            "Redis": named_cpu("redis-server", "valkey-server"),
        }

    def snapshot(self) -> dict[str, dict[int, float]]:
        return {part: sample() for part, sample in self.parts.items()}

    @staticmethod
    def spent(
        before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]
    ) -> dict[str, float]:
        return {
            part: sum(max(t - before.get(part, {}).get(pid, 0.0), 0.0) for pid, t in now.items())
            for part, now in after.items()
        }


def _python_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TICKETING_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


class Served:
    """A server the benchmark started as a child process (or none yet)."""

    child: Child | None = None

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()
            self.child = None

    def cpu(self) -> dict[int, float]:
        return self.child.cpu() if self.child else {}


class Platform(Served):
    """`ticketing up` on the real PostgreSQL, NATS and Redis, or a platform already running."""

    def __init__(
        self, config: Config, jwt_key: str, relays: dict[str, Relay] | None = None
    ) -> None:
        self.config = config
        self.jwt_key = jwt_key
        self.child: Child | None = None
        self.port = free_port()
        self.url = config.url or f"http://127.0.0.1:{self.port}"
        self.ttl_seconds: int | None = None
        # With connections dropped, the platform reaches NATS and Redis through these.
        self.relays = relays or {}

    @property
    def managed(self) -> bool:
        return self.config.url is None

    def env(self, ttl_seconds: int) -> dict[str, str]:
        config = self.config
        chaos = {"TICKETING_LISTENER_ACK_WAIT_SECONDS": str(CHAOS_ACK_WAIT_SECONDS)}
        return _python_env(
            {
                **(chaos if config.chaos else {}),
                "TICKETING_DATABASE_URL": database_url(config, "{service}", "postgresql+asyncpg"),
                "TICKETING_NATS_URL": self._via("NATS", config.nats_url),
                "TICKETING_REDIS_URL": self._via("Redis", config.redis_url),
                "TICKETING_NATS_STREAM": config.stream,
                "TICKETING_NATS_SUBJECT_PREFIX": config.subject_prefix,
                "TICKETING_JWT_KEY": self.jwt_key,
                "TICKETING_ORDER_TTL_SECONDS": str(ttl_seconds),
                "TICKETING_DATA_DIR": str(config.out_dir / "platform-data"),
                "TICKETING_LOG_LEVEL": "WARNING",
            }
        )

    def _via(self, server: str, url: str) -> str:
        relay = self.relays.get(server)
        return relay.url if relay else url

    async def start(self, ttl_seconds: int) -> None:
        if not self.managed:
            return
        args = [
            sys.executable,
            "-c",
            "from ticketing.cli import main; main()",
            "up",
            "--port",
            str(self.port),
            "--workers",
            str(self.config.workers),
            "--log-level",
            "warning",
        ]
        self.child = Child(
            "platform", args, self.env(ttl_seconds), self.config.out_dir / "platform.log"
        )
        self.ttl_seconds = ttl_seconds
        await wait_ready(f"{self.url}/api/tickets", self.child)


class Ceiling(Served):
    """bench/ceiling served by uvicorn with as many workers as the platform has."""

    def __init__(self, config: Config, jwt_key: str) -> None:
        self.config = config
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.jwt_key = jwt_key
        self.child: Child | None = None

    async def start(self) -> None:
        env = _python_env(
            {
                "CEILING_DSN": database_url(self.config, "ceiling"),
                "CEILING_JWT_KEY": self.jwt_key,
            }
        )
        args = [
            sys.executable,
            "-m",
            "bench.ceiling",
            "--port",
            str(self.port),
            "--workers",
            str(self.config.workers),
        ]
        self.child = Child("ceiling", args, env, self.config.out_dir / "ceiling.log")
        await wait_ready(f"{self.url}/healthz", self.child)


async def wait_ready(url: str, child: Child) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited while starting; see {child.log}")
            try:
                async with http.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{child.name} did not answer {url} within {START_TIMEOUT_SECONDS:.0f}s")


def new_jwt_key() -> str:
    return secrets.token_urlsafe(48)
