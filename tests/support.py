"""Helpers for tests: waiting on a condition with a deadline, never on a fixed sleep."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TypeVar

import httpx

from ticketing.common.events import Envelope
from ticketing.common.messaging import Bus
from ticketing.common.settings import Settings
from ticketing.platform.embedded import ChildServer, EmbeddedNats

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]] | Callable[[], T],
    *,
    within: float = 10.0,
    interval: float = 0.05,
) -> T:
    """Poll `probe` (plain or async) until it returns a truthy value; fail at the deadline."""
    deadline = time.monotonic() + within
    while True:
        outcome = probe()
        value: T = await outcome if inspect.isawaitable(outcome) else outcome
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s (last value: {value!r})")
        await asyncio.sleep(interval)


async def consumer_settled(bus: Bus, durable: str) -> bool:
    """True once a durable consumer has nothing left to deliver and nothing awaiting an ack."""
    info = await bus.js.consumer_info(bus.stream, durable)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def stream_envelopes(bus: Bus, event_type: str | None = None) -> list[Envelope]:
    """Every envelope in the test's stream, in stream order (optionally one type only)."""
    info = await bus.js.stream_info(bus.stream)
    if info.state.messages == 0:
        return []
    found = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        raw = await bus.js.get_msg(bus.stream, seq)
        envelope = Envelope.model_validate_json(raw.data or b"")
        if event_type is None or envelope.type == event_type:
            found.append(envelope)
    return found


TICKETING = [sys.executable, "-m", "ticketing"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TICKETING_")}
    env.update(extra)
    return env


class Running:
    """A `ticketing` command running as a child process, its output in a file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        # A session of its own, as a command typed in a terminal has a process group of its own.
        self.process = subprocess.Popen(
            [*TICKETING, *args],
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text()

    def interrupt(self) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=30)

    def ctrl_c(self) -> int:
        """As Ctrl-C in a terminal: SIGINT to every process of the command's group at once."""
        os.killpg(self.process.pid, signal.SIGINT)
        return self.process.wait(timeout=30)


async def wait_healthy(base: str, proc: Running) -> None:
    async def healthy() -> bool:
        assert proc.process.poll() is None, proc.output()
        try:
            async with httpx.AsyncClient() as c:
                return (await c.get(f"{base}/healthz")).status_code == 200
        except httpx.TransportError:
            return False

    await eventually(healthy, within=30, interval=0.1)


ANNOUNCED = re.compile(r"The platform is at (\S+)(?: \(served on (\S+)\))?")


async def wait_up(proc: Running) -> str:
    """The address of a `ticketing up` started on --port 0 (it says which), once it serves."""

    async def announced() -> str | None:
        assert proc.process.poll() is None, proc.output()
        found = ANNOUNCED.search(proc.output())
        return (found.group(2) or found.group(1)) if found else None

    base = await eventually(announced, within=60, interval=0.1)
    await wait_healthy(base, proc)
    return base


@contextmanager
def frozen(server: ChildServer) -> Iterator[None]:
    """The server stopped (SIGSTOP: alive, its sockets open, answering nothing), resumed after
    whatever happens inside."""
    assert server.process is not None
    server.process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        server.process.send_signal(signal.SIGCONT)


@asynccontextmanager
async def own_nats_bus(
    settings: Settings, data_dir: Path
) -> AsyncIterator[tuple[EmbeddedNats, Bus]]:
    """A nats-server of the test's own (to freeze without touching the shared one), and a bus
    connected to it."""
    server = EmbeddedNats(data_dir)
    server.start()
    bus = Bus(settings.model_copy(update={"nats_url": server.url}))
    try:
        await bus.connect()
        yield server, bus
    finally:
        await bus.close()
        server.stop()
