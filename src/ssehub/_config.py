"""Hub settings: one frozen dataclass, validated once."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Final, Literal

from ._channel import DEFAULT_RING_SIZE
from ._exceptions import ConfigError

SlowPolicy = Literal["disconnect", "latest"]
SLOW_POLICIES: Final = ("disconnect", "latest")

DEFAULT_BACKEND: Final = "memory://"
DEFAULT_HEARTBEAT_INTERVAL: Final = 15.0
DEFAULT_RETRY_MS: Final = 3000
DEFAULT_MAX_BODY_SIZE: Final = 1024 * 1024
DEFAULT_MAX_REPLAY: Final = 10_000
DEFAULT_WRITE_TIMEOUT: Final = 30.0
DEFAULT_MAX_TOPICS: Final = 64
DEFAULT_SHUTDOWN_RETRY_MS: Final = 5000
DEFAULT_SHUTDOWN_GRACE: Final = 10.0
DEFAULT_MAX_STREAMS: Final = 10_000
"""Open streams per process. This machine kind allows 20,000 open files per process; a
stream holds one, and the rest is headroom for publishers, the log and the event loop."""
DEFAULT_OVERLOAD_RETRY_MS: Final = 10_000
DEFAULT_POLL_TIMEOUT: Final = 25.0
DEFAULT_MAX_POLL_TIMEOUT: Final = 60.0
DEFAULT_POLL_BATCH: Final = 1000
DEFAULT_POLL_THRESHOLD: Final = 0.8
DEFAULT_POLL_INTERVAL_MS: Final = 2000
DEFAULT_IDEMPOTENCY_WINDOW: Final = 300.0


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
    topic_policies: Mapping[str, SlowPolicy] = field(default_factory=dict)
    """Per-topic slow policies: topic name or glob pattern (``prices.*``) → policy; the
    first matching pattern wins, ``slow_policy`` applies to the rest."""
    max_replay: int = DEFAULT_MAX_REPLAY
    """Most events replayed from the log for one resume; beyond that the client gets a reset."""
    max_body_size: int = DEFAULT_MAX_BODY_SIZE
    """Largest publish body in bytes (413 above it)."""
    max_topics: int = DEFAULT_MAX_TOPICS
    """Most topics in one subscription."""
    write_timeout: float = DEFAULT_WRITE_TIMEOUT
    """Seconds one write to a stream may take before the connection is closed; 0 = no limit."""
    max_lifetime: float = 0.0
    """Seconds a stream may stay open (jittered to 80-100 %), then ``event: disconnect``
    with reason ``lifetime``; 0 = no limit."""
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    """Seconds a shutdown waits for streams to take their disconnect event and close."""
    shutdown_retry_ms: int = DEFAULT_SHUTDOWN_RETRY_MS
    """Upper bound of the jittered ``retry:`` hint sent with the shutdown disconnect."""
    max_streams: int = DEFAULT_MAX_STREAMS
    """Open streams per process; more are refused as overloaded."""
    max_streams_per_ip: int = 0
    """Open streams per client address; 0 = no limit. Off by default because behind a
    reverse proxy every client shares the proxy's address."""
    overload_retry_ms: int = DEFAULT_OVERLOAD_RETRY_MS
    """Upper bound of the jittered back-off told to refused clients."""
    poll_threshold: float = DEFAULT_POLL_THRESHOLD
    """Stream utilisation (0-1) from which the capacity endpoint recommends long-polling."""
    poll_interval_ms: int = DEFAULT_POLL_INTERVAL_MS
    """Pause between long-polls that the capacity endpoint recommends."""
    max_poll_timeout: float = DEFAULT_MAX_POLL_TIMEOUT
    """Longest a long-poll may hold (the ``timeout`` parameter is capped to it)."""
    poll_batch: int = DEFAULT_POLL_BATCH
    """Most events in one long-poll answer."""
    idempotency_window: float = DEFAULT_IDEMPOTENCY_WINDOW
    """Seconds an ``Idempotency-Key`` on publish is remembered; 0 = keys are ignored."""
    max_batch: int = 1000
    """Most events appended to the log in one group commit."""

    def __post_init__(self) -> None:
        for name in (
            "heartbeat_interval",
            "write_timeout",
            "max_lifetime",
            "shutdown_grace",
            "max_poll_timeout",
            "idempotency_window",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 seconds")
        for name in (
            "retry_ms",
            "shutdown_retry_ms",
            "overload_retry_ms",
            "poll_interval_ms",
            "max_streams_per_ip",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        for name in (
            "ring_size",
            "max_replay",
            "max_body_size",
            "max_topics",
            "max_batch",
            "max_streams",
            "poll_batch",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if not 0 < self.poll_threshold <= 1:
            raise ConfigError("poll_threshold must be in (0, 1]")
        for policy in (self.slow_policy, *self.topic_policies.values()):
            if policy not in SLOW_POLICIES:
                raise ConfigError(f"slow policy must be 'disconnect' or 'latest', not {policy!r}")
        object.__setattr__(self, "topic_policies", MappingProxyType(dict(self.topic_policies)))

    def policy_for(self, topic: str) -> SlowPolicy:
        """The slow-client policy of ``topic``."""
        for pattern, policy in self.topic_policies.items():
            if pattern == topic or fnmatch.fnmatchcase(topic, pattern):
                return policy
        return self.slow_policy

    @classmethod
    def from_settings(cls, **settings: Any) -> HubConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(settings) - names
        if unknown:
            raise ConfigError(f"unknown hub setting(s): {', '.join(sorted(unknown))}")
        return cls(**settings)
