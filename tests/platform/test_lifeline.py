"""A worker process asks to stop with its supervisor before it imports anything heavy."""

from __future__ import annotations

import subprocess
import sys

# Run in a fresh interpreter: what importing the entry, and returning from it, pulled in.
_PROBE = """
import os, sys
from ticketing.platform import lifeline
heavy = {"ticketing", "uvicorn", "fastapi", "sqlalchemy", "nats"}
before = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
lifeline.worker_main(os.getppid() + 1)  # not our parent: as if the supervisor died at once
after = "ticketing.platform.workers" in sys.modules
print(before, after)
"""


def test_the_entry_of_a_worker_is_the_standard_library_alone() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True)
    before, imported_workers = out.stdout.rsplit(" ", 1)
    assert before == str(["ticketing", "ticketing.platform", "ticketing.platform.lifeline"])
    # A supervisor gone before the worker asked the kernel: the worker ends without importing
    # the services it would have served.
    assert imported_workers.strip() == "False"
