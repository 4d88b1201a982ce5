"""A pause that grows while something keeps failing: for restarting what stopped."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Backoff:
    """The first pause after a failure, doubled for each failure in a row, up to the longest;
    a success starts it over."""

    first: float
    longest: float
    failures: int = 0  # in a row

    def failed(self) -> float:
        """Note a failure; the pause before trying again."""
        self.failures += 1
        return min(self.first * 2.0 ** (self.failures - 1), self.longest)

    def succeeded(self) -> None:
        self.failures = 0
