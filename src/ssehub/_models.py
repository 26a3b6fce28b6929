"""Value objects shared by the hub, the backends and the wire codec."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from ._exceptions import InvalidEventError, InvalidTopicError

Topic = str
EventId = str

TOPIC_PATTERN: Final = re.compile(r"[A-Za-z0-9\-_.:/@]{1,200}")
"""Topic names: 1-200 letters, digits and ``-_.:/@`` (DESIGN.md)."""

_FORBIDDEN_IN_FIELD: Final = re.compile(r"[\r\n\x00]")


def validate_topic(topic: str) -> str:
    """Return ``topic`` or raise :class:`InvalidTopicError` saying what is wrong."""
    if TOPIC_PATTERN.fullmatch(topic) is None:
        if not topic:
            raise InvalidTopicError("topic name is empty")
        if len(topic) > 200:
            raise InvalidTopicError(f"topic name is {len(topic)} characters long; the limit is 200")
        raise InvalidTopicError(
            f"topic name {topic!r} may only contain letters, digits and '-_.:/@'"
        )
    return topic


def validate_event_name(event: str | None) -> str | None:
    """Refuse event names that could inject SSE fields (CR, LF, NUL) or are empty."""
    if event is None:
        return None
    if not isinstance(event, str):
        raise InvalidEventError("event name must be a string")
    if event == "":
        raise InvalidEventError("event name must not be empty")
    if _FORBIDDEN_IN_FIELD.search(event):
        raise InvalidEventError("event name must not contain CR, LF or NUL characters")
    if len(event) > 200:
        raise InvalidEventError("event name is longer than 200 characters")
    return event


def validate_retry(retry: int | None) -> int | None:
    """``retry`` is a reconnection delay in milliseconds: a non-negative integer."""
    if retry is None:
        return None
    if isinstance(retry, bool) or not isinstance(retry, int) or retry < 0:
        raise InvalidEventError("retry must be a non-negative integer (milliseconds)")
    return retry


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event about to be appended: everything but the id the log assigns."""

    topic: Topic
    data: str
    """The ``data`` payload as sent on the wire (JSON text, or raw text)."""
    event: str | None = None
    retry: int | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """A stored event. ``id`` is the hub-wide sequence number, strictly increasing."""

    id: int
    topic: Topic
    data: str
    event: str | None = None
    retry: int | None = None
    time: float = 0.0
    """Unix time (seconds) when the log accepted it; used for retention by age."""

    @property
    def event_id(self) -> EventId:
        """The id as it appears on the wire (a decimal string)."""
        return str(self.id)
