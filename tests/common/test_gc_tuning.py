"""A serving process freezes what start-up built and collects less often."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from ticketing.common.gc_tuning import OLDER_THRESHOLDS, YOUNG_THRESHOLD, tune_for_serving


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_gc")
def test_start_up_objects_are_frozen_and_collections_are_rarer() -> None:
    built_at_start_up: list[list[int]] = [[n] for n in range(10)]
    assert any(o is built_at_start_up for o in gc.get_objects())
    tune_for_serving()
    # Frozen: no collection walks it any more.
    assert not any(o is built_at_start_up for o in gc.get_objects())
    assert gc.get_threshold() == (YOUNG_THRESHOLD, *OLDER_THRESHOLDS)
    assert YOUNG_THRESHOLD > 700  # the interpreter's default
