"""What a run does: sizes of each phase and where the parts it measures are."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Config:
    sellers: int = 10
    tickets: int = 2000
    buyers: int = 16
    # Buyers go for the best seats: each picks among the first `hot` tickets still listed, so
    # several buyers race for each ticket and most attempts lose.
    hot: int = 4
    # The ceiling and the platform rush in turns, a slice of the tickets each, so that the speed
    # of a shared machine (which drifts by a third within minutes) is the same for both.
    rounds: int = 4
    expiring: int = 200
    expiry_ttl_seconds: int = 3
    workers: int = 2
    # A running platform to measure instead of starting one (its TTL decides the expiry phase).
    url: str | None = None
    # The PostgreSQL server; the run makes and drops databases bench_flash_* on it.
    postgres_url: str = "postgresql://postgres@127.0.0.1:5432"
    # With --url: the platform's own database template, for the checks ({service} filled in).
    database_template: str | None = None
    nats_url: str = "nats://127.0.0.1:4222"
    redis_url: str = "redis://127.0.0.1:6379/0"
    subject_prefix: str = "benchflash"
    # The run's own databases (this prefix, then the service's name) and stream.
    databases: str = "bench_flash_"
    stream: str = "BENCH_FLASH"
    # Kill one of the platform's worker processes outright (SIGKILL) every so many seconds of
    # the rush, request and events workers in turn: whatever it was doing is cut off, and the
    # checks must still find nothing oversold or lost.
    kill_every: float | None = None
    # End every connection of the platform to PostgreSQL (from the server's side), NATS and
    # Redis (a relay in between) every so many seconds of the rush and of the expiry phase, as
    # a restart of those servers does: a 503 is then an expected answer.
    drop_connections_every: float | None = None
    ceiling: bool = True
    out_dir: Path = Path("artifacts/bench")
    json_path: Path | None = None
    chart_path: Path | None = None

    @classmethod
    def quick(cls, **changes: object) -> Config:
        """Every phase, small: a smoke test well under a minute."""
        sizes = {"sellers": 2, "tickets": 120, "buyers": 8, "rounds": 2, "expiring": 20,
                 "expiry_ttl_seconds": 2}  # fmt: skip
        return dataclasses.replace(cls(), **{**sizes, **changes})  # type: ignore[arg-type]

    @property
    def chaos(self) -> bool:
        return self.kill_every is not None or self.drop_connections_every is not None

    @property
    def chart(self) -> Path:
        return self.chart_path or self.out_dir / "flash-sale.png"
