"""Hub settings: one frozen dataclass, validated once."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Final, Literal

from ._channel import DEFAULT_RING_SIZE
from ._exceptions import ConfigError

SlowPolicy = Literal["disconnect", "latest"]

DEFAULT_BACKEND: Final = "memory://"
DEFAULT_HEARTBEAT_INTERVAL: Final = 15.0
DEFAULT_RETRY_MS: Final = 3000
DEFAULT_MAX_BODY_SIZE: Final = 1024 * 1024
DEFAULT_MAX_REPLAY: Final = 10_000
DEFAULT_WRITE_TIMEOUT: Final = 30.0
DEFAULT_MAX_TOPICS: Final = 64
DEFAULT_SHUTDOWN_RETRY_MS: Final = 5000
DEFAULT_POLL_TIMEOUT: Final = 25.0


@dataclass(frozen=True, slots=True)
class HubConfig:
    """Every tunable of a hub. Durations are float seconds unless the name says ``_ms``."""

    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    """Seconds of silence after which an idle stream gets a comment line; 0 = off."""
    retry_ms: int = DEFAULT_RETRY_MS
    """The ``retry:`` hint sent when a stream opens (client reconnection delay)."""
    ring_size: int = DEFAULT_RING_SIZE
    """Recent events kept in memory per subscribed topic; a subscriber further behind lags."""
    slow_policy: SlowPolicy = "disconnect"
    """What happens to a lagging subscriber: ``disconnect`` (resume from the log) or
    ``latest`` (skip to the newest event, after an ``event: reset``)."""
    max_replay: int = DEFAULT_MAX_REPLAY
    """Most events replayed from the log for one resume; beyond that the client gets a reset."""
    max_body_size: int = DEFAULT_MAX_BODY_SIZE
    """Largest publish body in bytes (413 above it)."""
    max_topics: int = DEFAULT_MAX_TOPICS
    """Most topics in one subscription."""
    write_timeout: float = DEFAULT_WRITE_TIMEOUT
    """Seconds one write to a stream may take before the connection is closed; 0 = no limit."""
    shutdown_retry_ms: int = DEFAULT_SHUTDOWN_RETRY_MS
    """Upper bound of the jittered ``retry:`` hint sent with the shutdown disconnect."""
    max_batch: int = 1000
    """Most events appended to the log in one group commit."""

    def __post_init__(self) -> None:
        if self.heartbeat_interval < 0:
            raise ConfigError("heartbeat_interval must be >= 0 seconds (0 = off)")
        if self.retry_ms < 0 or self.shutdown_retry_ms < 0:
            raise ConfigError("retry hints must be >= 0 milliseconds")
        if self.ring_size < 1:
            raise ConfigError("ring_size must be at least 1")
        if self.slow_policy not in ("disconnect", "latest"):
            raise ConfigError(
                f"slow_policy must be 'disconnect' or 'latest', not {self.slow_policy!r}"
            )
        for name in ("max_replay", "max_body_size", "max_topics", "max_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.write_timeout < 0:
            raise ConfigError("write_timeout must be >= 0 seconds (0 = no limit)")

    @classmethod
    def from_settings(cls, **settings: Any) -> HubConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(settings) - names
        if unknown:
            raise ConfigError(f"unknown hub setting(s): {', '.join(sorted(unknown))}")
        return cls(**settings)
