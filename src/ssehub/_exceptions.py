"""The whole ssehub error tree.

::

    HubError
    ├── ConfigError                 invalid settings or backend URL
    ├── InvalidRequestError         → 400 (malformed JSON, missing topic, bad parameter)
    │   ├── InvalidTopicError       → 400 (topic name outside the allowed pattern)
    │   ├── InvalidEventError       → 400 (CR/LF/NUL in an event name, bad retry)
    │   └── UnsupportedMediaTypeError → 415
    ├── PayloadTooLargeError        → 413
    ├── CapacityError               → 503 + Retry-After (stream limit of the process reached)
    │   └── ClientLimitError        → 429 + Retry-After (stream limit of one client address)
    ├── BackendError                a backend failed
    │   ├── BackendUnavailableError → 503 (transient: retry with backoff)
    │   └── HistoryGoneError        the resume point cannot be replayed (.reason)
    ├── HubClosedError              → 503 (the hub is not running or is draining)
    └── ClientError                 raised only by ssehub.client
        ├── StreamProtocolError     bad Content-Type or malformed stream
        └── StreamRefusedError      the server said stop (401, 403, 204, other 4xx)

Domain errors carry no HTTP knowledge: the routes own the mapping table.
"""

from __future__ import annotations


class HubError(Exception):
    """Base class of every error ssehub raises on purpose."""

    code: str = "hub_error"
    """A short machine-readable code, used as ``error`` in JSON error bodies."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.detail!r})"


class ConfigError(HubError):
    """Raised for invalid settings or an unknown backend URL."""

    code = "config"


class InvalidRequestError(HubError):
    """Raised when a request is malformed (bad JSON, missing or bad parameter)."""

    code = "invalid_request"


class InvalidTopicError(InvalidRequestError):
    """Raised when a topic name is outside the allowed pattern."""

    code = "invalid_topic"


class InvalidEventError(InvalidRequestError):
    """Raised when an event's fields could break the wire format (CR/LF/NUL, bad retry)."""

    code = "invalid_event"


class UnsupportedMediaTypeError(InvalidRequestError):
    """Raised when a publish body has a Content-Type the hub does not accept."""

    code = "unsupported_media_type"


class PayloadTooLargeError(HubError):
    """Raised when a publish body exceeds the configured limit."""

    code = "payload_too_large"


class CapacityError(HubError):
    """Raised when a new stream would exceed the process's stream limit."""

    code = "over_capacity"

    def __init__(self, detail: str, retry_after: float = 10.0) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class ClientLimitError(CapacityError):
    """Raised when a new stream would exceed the per-client-address stream limit."""

    code = "over_ip_limit"


class BackendError(HubError):
    """Raised when a backend (event log) fails."""

    code = "backend"


class BackendUnavailableError(BackendError):
    """Raised when a backend cannot be reached; transient, retry with backoff."""

    code = "backend_unavailable"


class HistoryGoneError(BackendError):
    """Raised when events after a resume point are not all retained (or never existed).

    ``reason`` is one of ``"malformed"``, ``"unknown"``, ``"future"``, ``"trimmed"``,
    ``"too_far_behind"``.
    """

    code = "history_gone"

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason!r}, {self.detail!r})"


class HubClosedError(HubError):
    """Raised when the hub is not started, closed, or draining for shutdown."""

    code = "unavailable"


class ClientError(HubError):
    """Base class of errors raised by :mod:`ssehub.client`."""

    code = "client"


class StreamProtocolError(ClientError):
    """Raised by the client when a response is not a valid event stream."""

    code = "stream_protocol"


class StreamRefusedError(ClientError):
    """Raised by the client when the server answers in a way that means "stop"."""

    code = "stream_refused"

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
