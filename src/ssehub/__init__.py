"""ssehub: a Server-Sent Events hub for FastAPI with replay, backpressure and pluggable backends."""

from __future__ import annotations

from ._app import create_app
from ._channel import DisconnectReason
from ._config import HubConfig, SlowPolicy
from ._exceptions import (
    BackendError,
    BackendUnavailableError,
    CapacityError,
    ClientError,
    ClientLimitError,
    ConfigError,
    HistoryGoneError,
    HubClosedError,
    HubError,
    InvalidEventError,
    InvalidRequestError,
    InvalidTopicError,
    PayloadTooLargeError,
    StreamProtocolError,
    StreamRefusedError,
    UnsupportedMediaTypeError,
)
from ._hub import Hub, HubStatistics, ResetNotice
from ._models import Event, EventId, NewEvent, Topic
from ._server import HubServer, server_config
from .backends import EventLog, Retention, open_event_log

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "BackendUnavailableError",
    "CapacityError",
    "ClientError",
    "ClientLimitError",
    "ConfigError",
    "DisconnectReason",
    "Event",
    "EventId",
    "EventLog",
    "HistoryGoneError",
    "Hub",
    "HubClosedError",
    "HubConfig",
    "HubError",
    "HubServer",
    "HubStatistics",
    "InvalidEventError",
    "InvalidRequestError",
    "InvalidTopicError",
    "NewEvent",
    "PayloadTooLargeError",
    "ResetNotice",
    "Retention",
    "SlowPolicy",
    "StreamProtocolError",
    "StreamRefusedError",
    "Topic",
    "UnsupportedMediaTypeError",
    "__version__",
    "create_app",
    "open_event_log",
    "server_config",
]
