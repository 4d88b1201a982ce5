"""Looking again for what a client names before its event has reached the replica."""

from __future__ import annotations

from ticketing.common.messaging import replicated


async def test_what_arrives_while_looking_is_returned_at_once() -> None:
    reads: list[int] = []

    async def read() -> str | None:
        reads.append(1)
        return "ticket" if len(reads) == 3 else None

    assert await replicated(read) == "ticket"
    assert len(reads) == 3


async def test_what_never_arrives_costs_a_handful_of_reads_then_none() -> None:
    reads: list[int] = []

    async def read() -> str | None:
        reads.append(1)
        return None

    assert await replicated(read) is None
    # 20, 40, 80, 160 ms, then every 200 ms until the second is up: never one every few ms.
    assert 2 <= len(reads) <= 9
