"""Typed rows that flow between the sources and the Beam pipeline."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

MAX_RAW_CHARS = 500  # raw text kept in a quarantine row
MAX_SHOWN_CHARS = 100  # a value quoted in a quarantine row's detail


class Interaction(NamedTuple):
    """One accepted (user, item, time) event.

    Attributes:
        user_id: raw user id, non-empty, no whitespace.
        item_id: raw item id, non-empty, no whitespace.
        timestamp: integer event time (or position, for sources without time).
        category: optional item category carried on the row itself.
    """

    user_id: str
    item_id: str
    timestamp: int
    category: Optional[str] = None


class ItemCategory(NamedTuple):
    """The category of one item, from an item side table."""

    item_id: str
    category: str


class Rejected(NamedTuple):
    """A malformed input row, written to the quarantine with its reason.

    Attributes:
        source: the file (or logical source) the row came from.
        reason: short machine-readable reason, e.g. ``wrong_field_count``.
        detail: human-readable explanation.
        raw: the row as text (undecodable bytes escaped), truncated.
    """

    source: str
    reason: str
    detail: str
    raw: str


class Skipped(NamedTuple):
    """A well-formed row left out by policy (e.g. ``tab != 1``); counted, not quarantined."""

    source: str
    reason: str


ParseResult = Union[Interaction, ItemCategory, Rejected, Skipped]


def raw_text(raw: Union[bytes, str]) -> str:
    """Returns a printable, truncated form of a raw row for the quarantine."""
    if isinstance(raw, bytes):
        text = raw.decode("utf-8", errors="backslashreplace")
    else:
        text = raw
    text = text.rstrip("\r\n")
    if len(text) > MAX_RAW_CHARS:
        text = text[:MAX_RAW_CHARS] + "...[truncated]"
    return text


def shown(value: Any) -> str:
    """``repr(value)``, truncated to ``MAX_SHOWN_CHARS``, for messages and row details."""
    text = repr(value)
    if len(text) > MAX_SHOWN_CHARS:
        text = text[:MAX_SHOWN_CHARS] + "...[truncated]"
    return text


def valid_id(value: str) -> bool:
    """An id is valid if non-empty and free of whitespace and control characters."""
    return bool(value) and value.isprintable() and not any(c.isspace() for c in value)
