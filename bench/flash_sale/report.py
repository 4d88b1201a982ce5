"""Numbers from the phases: a rich table, a JSON file and a PNG chart."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.flash_sale.chaos import ChaosResult
from bench.flash_sale.checks import Checks
from bench.flash_sale.phases import ExpiryResult, PayResult
from bench.flash_sale.rush import RushResult

SATURATED = 0.9  # of one core: past this the load generator, not the target, sets the pace


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


@dataclass
class Target:
    """One target's rush, with the CPU each part spent during it."""

    name: str
    rush: RushResult
    cpu: dict[str, float]

    def add(self, turn: RushResult, cpu: dict[str, float]) -> None:
        """A later turn of the same target: its attempts after these, its CPU added."""
        self.rush.extend(turn)
        for part, seconds in cpu.items():
            self.cpu[part] = self.cpu.get(part, 0.0) + seconds

    @property
    def orders_per_s(self) -> float:
        return len(self.rush.wins) / self.rush.duration if self.rush.duration else 0.0

    @property
    def attempts_per_s(self) -> float:
        return len(self.rush.attempts) / self.rush.duration if self.rush.duration else 0.0

    def latency(self, q: float, status: int | None = None) -> float | None:
        return pct([a.latency for a in self.rush.attempts if status in (None, a.status)], q)

    @property
    def generator_load(self) -> float:
        """CPU of the load generator as a fraction of one core over the rush."""
        spent = self.cpu.get("load generator", 0.0)
        return spent / self.rush.duration if self.rush.duration else 0.0


@dataclass
class Report:
    settings: dict[str, Any]
    platform: Target
    ceiling: Target | None
    convergence: list[float]
    not_converged: int
    pay: PayResult
    expiry: ExpiryResult | None
    checks: Checks
    notes: list[str] = field(default_factory=list)
    chaos: ChaosResult | None = None  # faults during the rush (--kill-every and the like)

    @property
    def _explained(self) -> set[str]:
        """The answers a fault explains: none at all from a killed worker, a 503 from a
        dropped database connection. They are expected, and counted apart."""
        if self.chaos is None:
            return set()
        explained = set()
        if self.chaos.killing:
            explained.add("0")
        if self.chaos.drops:
            explained.add("503")
        return explained

    def _unexpected(self, target: Target) -> dict[str, int]:
        """Unexpected answers by status."""
        counts = target.rush.unexpected_statuses
        return {k: v for k, v in counts.items() if k not in self._explained}

    def _faults(self) -> dict[str, Any]:
        """What the rush's faults did (None each without them)."""
        chaos, rush = self.chaos, self.platform.rush
        keys = ("workers_killed", "events_workers_killed_in_expiry", "attempts_cut_off_by_kills",
                "connection_drops", "connections_dropped", "nats_connections_cut",
                "redis_connections_cut", "connection_drops_in_expiry",
                "answers_503_while_dropping", "consumers_caught_up")  # fmt: skip
        if chaos is None:
            return dict.fromkeys(keys)
        values = (chaos.by_role(), len(chaos.expiry_kills), rush.transport_errors,
                  len(chaos.drops), sum(chaos.drops), chaos.cut.get("NATS"),
                  chaos.cut.get("Redis"), len(chaos.expiry_drops),
                  rush.unexpected_statuses.get("503", 0) if chaos.drops else None,
                  chaos.drained)  # fmt: skip
        return dict(zip(keys, values, strict=True))

    def _expiry_drops(self) -> str:
        assert self.chaos is not None
        chaos = self.chaos
        cut = " / ".join(str(chaos.expiry_cut.get(server, 0)) for server in ("NATS", "Redis"))
        return f"{len(chaos.expiry_drops)} ({sum(chaos.expiry_drops)} database, {cut} NATS / Redis)"

    def summary(self) -> dict[str, Any]:
        p, c = self.platform, self.ceiling
        explained = self._explained
        unexpected = {"platform": self._unexpected(p), "ceiling": self._unexpected(c) if c else {}}
        ceiling_rate = c.orders_per_s if c else None
        paid = sum(1 for s in self.pay.statuses if s == 201)
        return {
            "orders_per_s": round(p.orders_per_s, 1),
            "attempts_per_s": round(p.attempts_per_s, 1),
            "ceiling_orders_per_s": round(ceiling_rate, 1) if ceiling_rate else None,
            "ceiling_attempts_per_s": round(c.attempts_per_s, 1) if c else None,
            "ratio_to_ceiling": round(p.orders_per_s / ceiling_rate, 3) if ceiling_rate else None,
            "order_p50_ms": ms(p.latency(50)),
            "order_p95_ms": ms(p.latency(95)),
            "order_p99_ms": ms(p.latency(99)),
            "order_201_p99_ms": ms(p.latency(99, 201)),
            "ceiling_p50_ms": ms(c.latency(50)) if c else None,
            "ceiling_p99_ms": ms(c.latency(99)) if c else None,
            "p99_to_ceiling": _ratio(p.latency(99), c.latency(99) if c else None),
            "orders": len(p.rush.wins),
            "attempts": len(p.rush.attempts),
            "oversold": self.checks.oversold,
            "disagreements": self.checks.disagreements,
            "double_charges": self.checks.double_charges,
            "lost_events": self.checks.lost_events
            + self.not_converged
            + self.pay.incomplete
            + (self.expiry.not_cancelled + self.expiry.not_relisted if self.expiry else 0),
            "convergence_p50_ms": ms(pct(self.convergence, 50)),
            "convergence_p99_ms": ms(pct(self.convergence, 99)),
            "payments_per_s": round(paid / self.pay.seconds_to_complete, 1)
            if self.pay.seconds_to_complete
            else None,
            "payments_failed": len(self.pay.statuses) - paid,
            "expiry_lateness_p50_ms": ms(pct(self.expiry.lateness, 50)) if self.expiry else None,
            "expiry_lateness_p99_ms": ms(pct(self.expiry.lateness, 99)) if self.expiry else None,
            "errors_5xx": sum(
                1 for a in p.rush.attempts if a.status >= 500 and str(a.status) not in explained
            )
            + sum(1 for s in self.pay.statuses if s >= 500),
            "unexpected_answers": sum(sum(counts.values()) for counts in unexpected.values()),
            "unexpected_statuses": unexpected,
            **self._faults(),
            "cpu_seconds": {
                "platform rush": _rounded(p.cpu),
                "ceiling rush": _rounded(c.cpu) if c else None,
            },
            "load_generator_core_share": round(p.generator_load, 2),
            "load_generator_saturated": p.generator_load > SATURATED
            or (c is not None and c.generator_load > SATURATED),
            "settings": self.settings,
            "notes": self.notes,
        }

    def failed(self) -> list[str]:
        """What makes the run a failure whatever the speed: wrong answers, not slow ones."""
        s = self.summary()
        problems = [
            f"{key} = {s[key]}"
            for key in (
                "oversold",
                "double_charges",
                "lost_events",
                "errors_5xx",
                "unexpected_answers",
                "payments_failed",
            )
            if s[key]
        ]
        if s["unexpected_answers"]:
            problems.append(f"unexpected answers by status: {s['unexpected_statuses']}")
        if self.platform.rush.transport_errors and "0" not in self._explained:
            problems.append(f"transport errors = {self.platform.rush.transport_errors}")
        if self.chaos and not self.chaos.drained:
            problems.append("consumers had not caught up after the rush's faults")
        return problems

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.summary(), indent=2) + "\n")

    def print(self, console: Console) -> None:
        s = self.summary()
        table = Table(title="flash sale", show_lines=False)
        table.add_column("measure")
        table.add_column("platform", justify="right")
        table.add_column("ceiling", justify="right")
        rows: list[tuple[str, Any, Any]] = [
            ("order attempts/s", s["attempts_per_s"], s["ceiling_attempts_per_s"]),
            ("successful orders/s", s["orders_per_s"], s["ceiling_orders_per_s"]),
            ("  ratio to the ceiling", s["ratio_to_ceiling"], None),
            ("POST /api/orders p50 ms", s["order_p50_ms"], s["ceiling_p50_ms"]),
            ("POST /api/orders p95 ms", s["order_p95_ms"], None),
            ("POST /api/orders p99 ms", s["order_p99_ms"], s["ceiling_p99_ms"]),
            ("orders / attempts", f"{s['orders']} / {s['attempts']}", None),
            (
                "convergence p50 / p99 ms",
                f"{s['convergence_p50_ms']} / {s['convergence_p99_ms']}",
                None,
            ),
            ("payments/s until all complete", s["payments_per_s"], None),
            (
                "expiry lateness p50 / p99 ms",
                f"{s['expiry_lateness_p50_ms']} / {s['expiry_lateness_p99_ms']}",
                None,
            ),
            ("oversold", s["oversold"], None),
            ("lost events", s["lost_events"], None),
            ("5xx answers", s["errors_5xx"], None),
        ]
        if self.chaos:
            killed = ", ".join(f"{n} {role}" for role, n in s["workers_killed"].items())
            rows += [
                ("workers killed in the rush", killed, None),
                ("attempts cut off by the kills", s["attempts_cut_off_by_kills"], None),
                ("events workers killed in the expiry", s["events_workers_killed_in_expiry"], None),
                (
                    "database connections dropped",
                    f"{s['connections_dropped']} in {s['connection_drops']} drops",
                    None,
                ),
                (
                    "NATS / Redis connections cut in the rush",
                    f"{s['nats_connections_cut']} / {s['redis_connections_cut']}",
                    None,
                ),
                ("connection drops in the expiry", self._expiry_drops(), None),
                ("503 answers while dropping", s["answers_503_while_dropping"], None),
                ("consumers caught up after", s["consumers_caught_up"], None),
            ]
        for part in sorted(set(self.platform.cpu) | set(self.ceiling.cpu if self.ceiling else {})):
            rows.append(
                (
                    f"CPU s in the rush: {part}",
                    _cpu(self.platform.cpu, part),
                    _cpu(self.ceiling.cpu, part) if self.ceiling else None,
                )
            )
        rows.append(
            (
                "load generator, share of a core",
                s["load_generator_core_share"],
                round(self.ceiling.generator_load, 2) if self.ceiling else None,
            )
        )
        for name, platform, ceiling in rows:
            table.add_row(name, _show(platform), _show(ceiling))
        console.print(table)
        if s["load_generator_saturated"]:
            console.print(
                "[yellow]The load generator saturated a core: the rates above are "
                "its limit as much as the target's.[/]"
            )
        for note in self.notes:
            console.print(f"note: {note}")

    def chart(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        targets = [t for t in (self.platform, self.ceiling) if t is not None]
        fig, (lat, rate, conv) = plt.subplots(1, 3, figsize=(16, 4.8))
        for target in targets:
            values = np.sort([a.latency * 1000 for a in target.rush.attempts])
            lat.plot(values, np.linspace(0, 1, len(values)), label=target.name)
            wins = np.array([a.start + a.latency for a in target.rush.attempts if a.status == 201])
            bins = np.arange(0, target.rush.duration + 0.25, 0.25)
            counts, edges = np.histogram(wins, bins=bins)
            rate.plot(edges[:-1], counts / 0.25, label=target.name)
        lat.set(
            xscale="log",
            xlabel="POST /api/orders latency (ms)",
            ylabel="fraction of attempts",
            title="Latency distribution",
        )
        rate.set(
            xlabel="seconds into the rush",
            ylabel="successful orders/s",
            title="Throughput over time",
        )
        conv.hist(np.array(self.convergence) * 1000, bins=40, color="tab:green")
        conv.set(
            xlabel="201 until the ticket is reserved (ms)",
            ylabel="orders",
            title="Event convergence lag",
        )
        for axis in (lat, rate):
            axis.legend()
            axis.grid(alpha=0.3)
        fig.suptitle(_caption(self.settings))
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _caption(settings: dict[str, Any]) -> str:
    keys = ("tickets", "buyers", "hot", "workers")
    return "flash sale: " + ", ".join(f"{k} {settings[k]}" for k in keys if k in settings)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def _rounded(cpu: dict[str, float]) -> dict[str, float]:
    return {part: round(seconds, 2) for part, seconds in cpu.items()}


def _cpu(cpu: dict[str, float], part: str) -> float | None:
    return round(cpu[part], 2) if part in cpu else None


def _show(value: Any) -> str:
    return "-" if value is None else str(value)
