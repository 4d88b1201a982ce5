"""Checks for text a client sends, so that odd input is a 400 and never a 500 downstream."""

from __future__ import annotations

from typing import Any, TypeGuard


def is_clean_text(value: Any) -> TypeGuard[str]:
    """A str that encodes as UTF-8 (no lone surrogate) with no NUL (PostgreSQL refuses it)."""
    if not isinstance(value, str) or "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
