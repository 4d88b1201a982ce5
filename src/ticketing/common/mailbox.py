"""The development mailbox: mail caught by the SMTP sink, one JSON file a message."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def mailbox_dir(data_dir: Path) -> Path:
    return data_dir.resolve() / "mailbox"


def read_mailbox(folder: Path) -> list[dict[str, Any]]:
    """The messages the sink caught, newest first."""
    if not folder.exists():
        return []
    files = sorted(folder.glob("*.json"), reverse=True)
    return [json.loads(f.read_text()) for f in files]
