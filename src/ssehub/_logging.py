"""Structured logging: structlog on top of the stdlib ``logging`` module.

`configure_logging` puts one handler on the root logger whose formatter is a
``structlog.stdlib.ProcessorFormatter``, so that records from structlog loggers
(``ssehub.access``) and from plain stdlib loggers (``ssehub.hub``, uvicorn) come out
the same way: JSON lines, or structlog's console renderer for people at a terminal.
Fields passed as ``extra={...}`` to a stdlib logger become fields of the output.

Secrets in query strings (``?token=…``) are masked: `RedactQueryFilter` rewrites
uvicorn's access records before they are formatted, and the formatter masks any string
field that holds a query string as a last line of defence.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Final, Literal, TextIO, final
from urllib.parse import unquote_plus

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = [
    "LogFormat",
    "RedactQueryFilter",
    "access_logger",
    "configure_logging",
    "redact_url",
    "skip_caller_lookup",
]

LogFormat = Literal["auto", "json", "console"]

REDACTED: Final = "***"
"""What a sensitive query parameter's value is replaced with."""

SENSITIVE_PARAM_PARTS: Final = (
    "token",
    "auth",
    "jwt",
    "key",
    "secret",
    "password",
    "passwd",
    "signature",
    "session",
    "credential",
    "code",
)
"""A query parameter whose lower-cased, decoded name contains one of these is masked."""

TRACE_LEVEL: Final = 5
"""uvicorn's ``trace`` level, accepted by `configure_logging` even if unregistered."""

UVICORN_LOGGERS: Final = ("uvicorn", "uvicorn.error", "uvicorn.access")
ACCESS_LOGGER_NAME: Final = "ssehub.access"

_REDACTED_MARK: Final = "_ssehub_redacted"
"""Set on a record whose message and arguments `RedactQueryFilter` has masked."""
_PAIR_SEPARATORS: Final = re.compile(r"([&;])")
_WORD: Final = re.compile(r"\S+")
_MAX_UNQUOTE_ROUNDS: Final = 3
_MAX_NESTED_URLS: Final = 3


@lru_cache(maxsize=1024)  # parameter names repeat (topic, last_event_id, token...)
def _is_sensitive(name: str) -> bool:
    # Undo percent-encoding a few times so ``%2574oken`` cannot slip through.
    for _ in range(_MAX_UNQUOTE_ROUNDS):
        decoded = unquote_plus(name, errors="replace")
        if decoded == name:
            break
        name = decoded
    lowered = name.lower()
    return any(part in lowered for part in SENSITIVE_PARAM_PARTS)


def _redact_pairs(text: str, depth: int) -> str:
    pieces = _PAIR_SEPARATORS.split(text)
    changed = False
    for index in range(0, len(pieces), 2):  # odd indices are the separators
        name, equals, value = pieces[index].partition("=")
        if not (equals and value):
            continue
        if _is_sensitive(name):
            pieces[index] = f"{name}={REDACTED}"
            changed = True
        elif "?" in value:  # ?next=/login?token=…
            # Past a few levels of nesting, mask the whole value rather than recurse.
            nested = _redact_url(value, depth + 1) if depth < _MAX_NESTED_URLS else REDACTED
            if nested != value:
                pieces[index] = f"{name}={nested}"
                changed = True
    return "".join(pieces) if changed else text


def redact_url(url_or_path: str) -> str:
    """Mask the values of sensitive query parameters in a URL or path.

    A parameter is sensitive when its decoded, lower-cased name contains one of
    `SENSITIVE_PARAM_PARTS`; its value becomes ``***``. The path, the other parameters,
    their order and their encoding are kept as they were. Pairs in a fragment
    (``#access_token=…``) and URLs nested in a value (``?next=/x?token=…``, a few
    levels deep) are treated the same way. Never raises.
    """
    return _redact_url(url_or_path, 0)


def _redact_url(url: str, depth: int) -> str:
    head, question, rest = url.partition("?")
    query, hash_, fragment = rest.partition("#")
    if not question:  # no query string; a fragment may still carry pairs
        head, hash_, fragment = url.partition("#")
        query = ""
    if hash_:
        fragment = _redact_pairs(fragment, depth)
    return f"{head}{question}{_redact_pairs(query, depth)}{hash_}{fragment}"


def _redact_text(text: str) -> str:
    """Apply `redact_url` to every whitespace-separated word holding a ``?``."""
    if "?" not in text:
        return text
    return _WORD.sub(_redact_word, text)


def _redact_word(match: re.Match[str]) -> str:
    word = match.group()
    return redact_url(word) if "?" in word else word


def _redact_value(value: object) -> object:
    return _redact_text(value) if isinstance(value, str) else value


@final
class RedactQueryFilter(logging.Filter):
    """Mask secrets in query strings of a record's message and arguments.

    uvicorn's access records carry ``(client_addr, method, full_path, http_version,
    status_code)`` as ``args``. Every string argument, and a string message, that holds
    a ``?`` has each of its whitespace-separated words passed through `redact_url`, so
    ``full_path`` is redacted as a whole. Never drops a record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = _redact_text(record.msg)
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(_redact_value(arg) for arg in args)
        elif isinstance(args, Mapping):
            record.args = {key: _redact_value(value) for key, value in args.items()}
        # The message and its arguments are clean now: the JSON formatter need not
        # redact them a second time (the extras it still does).
        record.__dict__[_REDACTED_MARK] = True
        return True


def _drop_color_message(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    # uvicorn passes a coloured copy of some messages as ``extra={"color_message": …}``.
    event_dict.pop("color_message", None)
    return event_dict


def _uvicorn_access_fields(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    # Needs ProcessorFormatter(pass_foreign_args=True); the args are never output as is.
    args = event_dict.pop("positional_args", None)
    record = event_dict.get("_record")
    if (
        record is not None
        and record.name == "uvicorn.access"
        and isinstance(args, tuple)
        and len(args) == 5
    ):
        client_addr, method, path, http_version, status_code = args
        event_dict.update(
            client_addr=client_addr,
            method=method,
            path=path,
            http_version=http_version,
            status_code=status_code,
        )
    return event_dict


def _redact_event_dict(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    for key, value in event_dict.items():
        if isinstance(value, str) and "?" in value:
            event_dict[key] = _redact_text(value)
    return event_dict


_RECORD_KEYS: Final = frozenset(
    logging.LogRecord("name", 0, "pathname", 0, "msg", (), None).__dict__
) | {"message", "asctime", "color_message", _REDACTED_MARK}
"""A record's own attributes: everything else on a record came from ``extra={...}``
(``color_message`` is uvicorn's coloured copy of the message, never output)."""

_UVICORN_ACCESS_FIELDS: Final = ("client_addr", "method", "path", "http_version", "status_code")
_encode_json: Final = json.JSONEncoder(default=repr).encode


_last_second: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text


def _timestamp(created: float) -> str:
    """ISO 8601 in UTC with microseconds, as structlog's ``TimeStamper(fmt="iso")``."""
    global _last_second
    second = int(created)
    cached = _last_second  # one read: another thread may replace it
    if cached[0] != second:
        cached = _last_second = (
            second,
            datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        )
    return f"{cached[1]}.{int((created - second) * 1_000_000):06d}Z"


def _line(event: str, level: str, logger: str, created: float) -> dict[str, Any]:
    """The first fields of a JSON line, as structlog's chain puts them: the event, any
    context variables bound with ``structlog.contextvars``, level, logger, timestamp."""
    line: dict[str, Any] = {"event": event}
    for key, value in structlog.contextvars.get_contextvars().items():
        line.setdefault(key, _redact_value(value))
    line["level"] = level
    line["logger"] = logger
    line["timestamp"] = _timestamp(created)
    return line


@final
class _JSONFormatter(structlog.stdlib.ProcessorFormatter):
    """JSON lines: structlog's processor chain for records from structlog loggers, and a
    direct path for stdlib records, which are every line ssehub and uvicorn write.

    The direct path writes the same fields as the chain did (``event``, ``level``,
    ``logger``, ``timestamp``, bound context variables, the extras, uvicorn's access
    fields, ``exception``), redacted the same way, for about a third of the CPU: a
    stream under ``ssehub serve`` at ``info`` writes two access lines, and through the
    chain those cost more than the stream itself (docs/benchmarks.md).
    """

    def format(self, record: logging.LogRecord) -> str:
        if "_logger" in record.__dict__:  # set by structlog's wrap_for_formatter
            return super().format(record)
        clean = _REDACTED_MARK in record.__dict__
        message = record.getMessage()
        line = _line(
            message if clean else _redact_text(message),
            record.levelname.lower(),
            record.name,
            record.created,
        )
        for key, value in record.__dict__.items():
            if key not in _RECORD_KEYS:
                line[key] = _redact_value(value)
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            for key, value in zip(_UVICORN_ACCESS_FIELDS, args, strict=True):
                line[key] = value if clean else _redact_value(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = record.stack_info
        return _encode_json(line)


@final
class _RootHandler(logging.StreamHandler[TextIO]):
    """The handler `configure_logging` owns on the root logger.

    Without an explicit stream it writes to whatever ``sys.stderr`` is at the time of
    each record (as ``logging.lastResort`` does), so replacing ``sys.stderr`` later,
    as pytest's capture does, never leaves it writing to a closed file.
    """

    def __init__(self, stream: TextIO | None) -> None:
        logging.Handler.__init__(self)
        self._stream = stream
        self._pending: list[str] = []
        self._scheduled = False

    @property
    def stream(self) -> TextIO:
        return sys.stderr if self._stream is None else self._stream

    @stream.setter
    def stream(self, value: TextIO) -> None:
        self._stream = value

    def sole_output(self, logger: logging.Logger) -> bool:
        """Whether this handler is all that a record of ``logger`` would meet: no
        filter and no other handler on the way from ``logger`` to the root, and this
        handler takes INFO lines."""
        if self.filters or self.level > logging.INFO:
            return False
        current: logging.Logger | None = logger
        while current is not None:
            if current.filters:
                return False
            if current is logging.root:
                return current.handlers == [self]
            if current.handlers or not current.propagate:
                return False
            current = current.parent
        return False

    def write_line(self, line: str) -> None:
        """Write one formatted line as `emit` would; from an event loop's thread, at the
        end of the loop's current step, together with the other lines of that step."""
        with self.lock:  # type: ignore[union-attr]  # Handler.__init__ made it
            self._pending.append(line)
            if self._scheduled:
                return
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop in this thread: now
                self._write_pending()
                return
            self._scheduled = True
        loop.call_soon(self.flush)

    def emit(self, record: logging.LogRecord) -> None:
        if self._pending:  # Handler.handle holds the lock
            self._write_pending()
        super().emit(record)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_pending()
            super().flush()

    def _write_pending(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        text = "\n".join(self._pending) + "\n"
        self._pending.clear()
        try:
            stream = self.stream
            stream.write(text)
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": text}))

    def close(self) -> None:
        self.flush()
        super().close()


def _parse_level(level: str) -> int:
    name = level.strip().upper()
    if name == "TRACE":
        return TRACE_LEVEL
    levels = logging.getLevelNamesMapping()
    if name not in levels:
        raise ValueError(f"unknown log level {level!r}; use debug, info, warning or error")
    return levels[name]


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def configure_logging(
    level: str = "info",
    fmt: LogFormat = "auto",
    *,
    stream: TextIO | None = None,
    access_log: bool = True,
) -> None:
    """Send all logging, stdlib and structlog alike, through one structured handler.

    ``fmt="json"`` writes one JSON object per line with ``timestamp`` (ISO 8601, UTC),
    ``level``, ``logger``, ``event`` and every extra field; ``"console"`` uses
    structlog's ``ConsoleRenderer``; ``"auto"`` picks the console renderer when the
    stream is a terminal and JSON otherwise. ``stream`` defaults to ``sys.stderr``.

    uvicorn's loggers lose their own handlers and levels and propagate to the root
    handler (run uvicorn with ``log_config=None`` so that it does not install its
    handlers again afterwards), and
    `RedactQueryFilter` is installed on ``uvicorn.access``. ``access_log=False`` silences
    the hub's per-stream lines (``ssehub.access``; pass ``access_log=False`` to uvicorn
    too for its request lines). Calling this again replaces the previous configuration
    instead of adding to it.
    """
    numeric_level = _parse_level(level)
    if fmt not in ("auto", "json", "console"):
        raise ValueError(f"unknown log format {fmt!r}; use auto, json or console")
    console = fmt == "console" or (fmt == "auto" and _isatty(stream or sys.stderr))

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Caching would pin loggers to the configuration of their first use, and this
        # function may run more than once (tests, embedding apps).
        cache_logger_on_first_use=False,
    )

    renderer: Processor
    final_steps: list[Processor]
    if console:
        # ConsoleRenderer formats exceptions itself (and warns if format_exc_info ran).
        renderer = structlog.dev.ConsoleRenderer(colors=_isatty(stream or sys.stderr))
        final_steps = [_redact_event_dict, renderer]
    else:
        renderer = structlog.processors.JSONRenderer()
        final_steps = [
            structlog.processors.format_exc_info,
            _redact_event_dict,
            renderer,
        ]
    formatter = (structlog.stdlib.ProcessorFormatter if console else _JSONFormatter)(
        foreign_pre_chain=[
            *shared,
            structlog.stdlib.ExtraAdder(),
            _drop_color_message,
            _uvicorn_access_fields,
        ],
        pass_foreign_args=True,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final_steps],
    )

    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _RootHandler)]:
        root.removeHandler(old)
        old.close()
    handler = _RootHandler(stream)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    _ACCESS_LOGGER.write_json_to(None if console else handler)
    root.setLevel(numeric_level)

    for name in UVICORN_LOGGERS:
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
        uvicorn_logger.setLevel(logging.NOTSET)  # follow the root level set above
    logging.getLogger(ACCESS_LOGGER_NAME).setLevel(
        logging.NOTSET if access_log else logging.WARNING
    )
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactQueryFilter) for f in access.filters):
        access.addFilter(RedactQueryFilter())


def skip_caller_lookup() -> None:
    """Stop the stdlib from finding the calling file, line, thread and process of every
    record, as the logging HOWTO's "Optimization" section describes.

    Neither output of `configure_logging` shows them, and the caller lookup walks the
    stack on every line (structlog's logger class, which uvicorn's loggers get, walks it
    further): a good part of the cost of uvicorn's request line, one per publish.
    Process-wide, so only for processes ssehub owns (``ssehub serve`` and its workers),
    never for an app that embeds the hub.
    """
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


class AccessLogger:
    """Access lines (stream open/close/refused) on the stdlib logger ``ssehub.access``.

    The fields become the record's extras: an app's own logging configuration decides
    where they go (nowhere below INFO), and :func:`configure_logging` renders them as
    fields of the JSON line. Nothing is formatted while INFO is disabled.

    When `configure_logging` writes JSON and its handler is the only place a line can go
    (nobody added a handler or filter since), a line skips the record and the handler
    chain and is written straight in the same format: a busy hub writes two of these per
    stream, and the record machinery was half of a line's cost.
    """

    __slots__ = ("_direct", "_logger")

    def __init__(self) -> None:
        self._logger = logging.getLogger(ACCESS_LOGGER_NAME)
        self._direct: _RootHandler | None = None

    def enabled(self) -> bool:
        """Whether lines are written (check before building costly fields)."""
        return self._logger.isEnabledFor(logging.INFO)

    def write_json_to(self, handler: _RootHandler | None) -> None:
        """Write lines straight to ``handler`` as JSON while it is their only output
        (None: always through the stdlib record machinery)."""
        self._direct = handler

    def info(self, event: str, **fields: Any) -> None:
        logger = self._logger
        if not logger.isEnabledFor(logging.INFO):
            return
        direct = self._direct
        if direct is not None and direct.sole_output(logger):
            line = _line(event, "info", ACCESS_LOGGER_NAME, time.time())
            for key, value in fields.items():
                line[key] = _redact_value(value)
            direct.write_line(_encode_json(line))
            return
        # What Logger.info does, less the caller lookup: every access line comes from
        # the same few places, and the lookup walks the stack each time.
        record = logger.makeRecord(
            logger.name, logging.INFO, _NO_FILE, 0, event, (), None, extra=fields
        )
        logger.handle(record)


_NO_FILE: Final = "(unknown file)"  # what the stdlib records when it skips the lookup
_ACCESS_LOGGER = AccessLogger()


def access_logger() -> AccessLogger:
    """The logger for per-request access lines (``ssehub.access``)."""
    return _ACCESS_LOGGER
