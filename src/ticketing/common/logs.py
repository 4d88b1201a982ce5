"""Structured logging: one JSON object a line in production, readable lines on a laptop."""

from __future__ import annotations

import json
import logging
import re
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

# The id that ties together an HTTP request, the events it causes, and the work of every
# listener downstream; set per request and per handled event.
correlation_id: ContextVar[str | None] = ContextVar("correlation_id", default=None)
CORRELATION_HEADER = "X-Correlation-ID"
NATS_CORRELATION_HEADER = "Ticketing-Correlation-Id"


class CorrelationFilter(logging.Filter):
    """Stamp every record with the current correlation id (None outside any request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "correlation_id"):
            record.correlation_id = correlation_id.get()
        return True


class SecretQueryFilter(logging.Filter):
    """Keep the one-time secrets that travel in URLs (a magic link's token) out of the access
    log: a line there must not be enough to sign in as someone."""

    SECRET = re.compile(r"(?<=[?&]token=)[^&\s]+")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                self.SECRET.sub("[redacted]", arg) if isinstance(arg, str) else arg
                for arg in record.args
            )
        return True


_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(*, json_lines: bool, level: str = "INFO") -> None:
    """Install one handler on the root logger; safe to call more than once."""
    handler = logging.StreamHandler()
    handler.addFilter(CorrelationFilter())
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, SecretQueryFilter) for f in access.filters):
        access.addFilter(SecretQueryFilter())
