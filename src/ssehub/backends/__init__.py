"""Backend roles as small Protocols, and ``open_event_log(url)``.

* :class:`EventLog` assigns ids, stores events and replays them (memory, SQLite, Redis).
* Backplanes (moving live events between hub processes) come with the Redis backend.

Implementations live side by side in this package and are imported lazily, so a
backend's driver is only needed when its URL scheme is used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable
from urllib.parse import parse_qs, urlsplit, urlunsplit

from .._exceptions import ConfigError, HistoryGoneError
from .._models import Event, NewEvent, Topic

__all__ = [
    "Backplane",
    "EventLog",
    "Retention",
    "SupportsBackplane",
    "SupportsHealth",
    "SupportsSize",
    "open_event_log",
]

DEFAULT_MAX_EVENTS_PER_TOPIC = 10_000
"""Retention by count: events kept per topic (older ones are trimmed)."""

DEFAULT_MAX_AGE = 24 * 3600.0
"""Retention by age in seconds (0 = keep regardless of age)."""


class Retention:
    """How much history an EventLog keeps, per topic."""

    __slots__ = ("max_age", "max_events")

    def __init__(
        self,
        max_events: int = DEFAULT_MAX_EVENTS_PER_TOPIC,
        max_age: float = DEFAULT_MAX_AGE,
    ) -> None:
        if max_events < 1:
            raise ConfigError("retention max_events must be at least 1")
        if max_age < 0:
            raise ConfigError("retention max_age must be >= 0 seconds (0 = no age limit)")
        self.max_events = max_events
        self.max_age = max_age

    def __repr__(self) -> str:
        return f"Retention(max_events={self.max_events}, max_age={self.max_age})"


class EventLog(Protocol):
    """An ordered, durable-ish log of events over all topics, with one id sequence.

    Ids are integers, strictly increasing across all topics, never reused: not after a
    restart (the log persists its sequence) and not after the log is wiped (a fresh log
    seeds its sequence from the clock in microseconds, so it starts above any id an
    earlier log could have issued).

    The *origin* is the id just before the first one this log issued; a resume point
    ``after`` is meaningful when ``origin <= after <= head``.
    """

    async def start(self) -> None:
        """Open files/connections and load the sequence. Called once before use."""

    async def append(self, events: Sequence[NewEvent]) -> list[Event]:
        """Append ``events`` atomically and in order, assigning consecutive ids.

        Returns the stored events, in the same order, with their ids and times.
        """

    async def read_after(self, topics: Sequence[Topic], after: int, *, limit: int) -> list[Event]:
        """Events of ``topics`` with ``id > after``, in id order, at most ``limit``.

        Raises :class:`~ssehub.HistoryGoneError` when the answer would not be complete:
        ``after < origin`` (reason ``"unknown"``), ``after > head`` (``"future"``), or an
        event of one of ``topics`` with an id above ``after`` was trimmed by retention
        (``"trimmed"``). Callers cap the work per request with ``limit`` and page.
        """

    def head(self) -> int:
        """The last id issued (``origin`` when nothing has been appended yet)."""

    def origin(self) -> int:
        """The id just before the first id this log issued."""

    async def trim(self) -> int:
        """Apply retention now; return the number of events removed."""

    async def aclose(self) -> None:
        """Flush and release everything. Idempotent."""


@runtime_checkable
class SupportsHealth(Protocol):
    """Optional: a backend that can tell whether it is reachable."""

    async def check_ready(self) -> None:
        """Return if the backend answers; raise BackendUnavailableError otherwise."""


class Backplane(Protocol):
    """Moves live events between hub processes that share one event log.

    ``run`` delivers every event appended by any node after ``start_after``, in id
    order and without gaps, to ``deliver(events, through)`` (a plain callback: it must
    not block; ``through`` is the id up to which everything has been delivered), until
    cancelled. Gaps (a reconnect, a dropped message) are filled from the log for the
    topics ``topics()`` names; when the log no longer holds them, ``on_gap`` is told.
    """

    last_id: int

    @property
    def connected(self) -> bool:
        """Whether it listens now."""

    async def wait_connected(self) -> None:
        """Return once it listens (events appended from then on will arrive)."""

    async def run(
        self,
        start_after: int,
        deliver: Callable[[list[Event], int], None],
        topics: Callable[[], Sequence[Topic]],
        on_gap: Callable[[Sequence[Topic], HistoryGoneError], None],
    ) -> None: ...


@runtime_checkable
class SupportsBackplane(Protocol):
    """Optional: a shared log whose appends other nodes must see (Redis)."""

    def backplane(self) -> Backplane:
        """A new backplane reading this log's announcements."""

    async def current_head(self) -> int:
        """The newest id any node has appended (``head()`` is this node's view)."""


@runtime_checkable
class SupportsSize(Protocol):
    """Optional: a backend that knows how many events it retains (for metrics)."""

    def event_count(self) -> int:
        """Events currently retained, over all topics (may be approximate). Never blocks."""


def open_event_log(url: str, retention: Retention | None = None) -> EventLog:
    """Create an EventLog from a URL: ``memory://``, ``sqlite:///path/to/file.db`` or
    ``redis://host:port/db`` (``rediss://`` for TLS; needs ``pip install 'ssehub[redis]'``).

    Query parameters override retention: ``?max_events=1000&max_age=3600``; Redis URLs
    also take ``prefix`` (the key prefix, default ``ssehub``).
    """
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    is_redis = parts.scheme in ("redis", "rediss")
    prefix = query.pop("prefix", "ssehub") if is_redis else "ssehub"
    retention = retention or Retention()
    try:
        retention = Retention(
            max_events=int(query.pop("max_events", retention.max_events)),
            max_age=float(query.pop("max_age", retention.max_age)),
        )
    except ValueError as exc:
        raise ConfigError(f"invalid retention setting in backend URL {url!r}: {exc}") from exc
    if query:
        raise ConfigError(f"unknown backend URL option(s): {', '.join(sorted(query))}")

    if parts.scheme == "memory":
        from .memory import MemoryEventLog

        return MemoryEventLog(retention=retention)
    if parts.scheme == "sqlite":
        # sqlite:///relative.db -> "relative.db"; sqlite:////abs/path.db -> "/abs/path.db"
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if parts.netloc:
            path = parts.netloc + "/" + path if path else parts.netloc
        if not path:
            raise ConfigError(f"sqlite backend URL needs a file path: {url!r}")
        from .sqlite import SQLiteEventLog

        return SQLiteEventLog(path, retention=retention)
    if is_redis:
        try:
            from .redis import RedisStreamsEventLog
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith("redis"):
                raise
            raise ConfigError(
                f"the Redis backend ({url!r}) needs redis-py: pip install 'ssehub[redis]'"
            ) from exc
        if not prefix:
            raise ConfigError(f"the Redis key prefix must not be empty in {url!r}")
        server_url = urlunsplit(parts._replace(query=""))
        return RedisStreamsEventLog(server_url, prefix=prefix, retention=retention)
    raise ConfigError(
        f"unknown backend URL scheme {parts.scheme!r} in {url!r}; "
        "use memory://, sqlite:///path.db or redis://host:port/db"
    )
