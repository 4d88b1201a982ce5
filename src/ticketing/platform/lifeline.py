"""A child process's tie to the process that started it, in the standard library alone.

A parent killed outright (SIGKILL, the OOM killer) runs no clean-up: without this its
children would serve on, orphaned, holding the port and the data dir that a restart needs.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

# prctl(2): have the kernel signal this process when the thread that started it exits.
_PR_SET_PDEATHSIG = 1


def stop_with_parent() -> Callable[[], None]:
    """A function that, run in a child process, has it sent SIGTERM once its parent is gone
    (Linux; elsewhere it does nothing). Resolved here, in the parent: between fork and exec
    the child should do as little as it can."""
    if not sys.platform.startswith("linux"):
        return lambda: None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def worker_main(supervisor: int, *args: Any) -> None:
    """Where a worker process of `ticketing up --workers N` starts. The kernel is asked to stop
    it with its supervisor before it imports the services (seconds, on a busy machine): a
    supervisor killed while a worker starts leaves no worker behind either. One that is gone
    already, before the kernel was asked, is seen by the parent's pid."""
    stop_with_parent()()
    if os.getppid() != supervisor:
        return
    # Only now: everything a worker serves is behind this import.
    from ticketing.platform.workers import serve_worker

    serve_worker(*args)
