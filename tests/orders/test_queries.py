"""The statements every attempt of a rush runs, as PostgreSQL plans them once prepared."""

from __future__ import annotations

import json

import pytest

from tests.conftest import Platform
from ticketing.common.db import _compiled_for_driver
from ticketing.orders import service


async def test_an_attempts_read_finds_the_holder_by_index_in_a_generic_plan(
    platform: Platform,
) -> None:
    """The driver prepares the read once; after a few runs PostgreSQL may keep a generic plan,
    made without the parameters' values. It must still look the holder up by the partial
    index (one active order per ticket), not read every order."""
    await platform.start("orders")
    db = platform.runtime("orders").db
    if db.is_sqlite:
        pytest.skip("SQLite plans each statement with its values")
    sql, names, _ = _compiled_for_driver(service._ticket_and_holder(), db.engine.dialect)
    pooled = await db.engine.raw_connection()
    try:
        driver = pooled.driver_connection
        await driver.execute("SET plan_cache_mode = force_generic_plan")
        await driver.execute(f"PREPARE attempt_read AS {sql}")
        values = ", ".join("NULL" for _ in names)
        plan = await driver.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE attempt_read({values})")
        await driver.execute("DEALLOCATE attempt_read")
        await driver.execute("RESET plan_cache_mode")
    except BaseException:
        pooled.invalidate()  # not back into the pool with the setting or the statement
        raise
    finally:
        pooled.close()
    # SQLAlchemy's dialect gives the driver a JSON codec: the plan may come decoded.
    plan = json.loads(plan) if isinstance(plan, str) else plan
    scans = {(node["Node Type"], node.get("Index Name")) for node in _nodes(plan)}
    assert ("Index Scan", "uq_orders_one_active_per_ticket") in scans
    assert not any(kind == "Seq Scan" for kind, _ in scans)


def _nodes(plan: list[dict[str, object]]) -> list[dict[str, object]]:
    found: list[dict[str, object]] = []
    pending = [plan[0]["Plan"]]
    while pending:
        node = pending.pop()
        assert isinstance(node, dict)
        found.append(node)
        pending.extend(node.get("Plans", []))
    return found
