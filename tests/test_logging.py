from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import structlog

from ssehub._logging import (
    RedactQueryFilter,
    access_logger,
    configure_logging,
    redact_url,
)

UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
ACCESS_FORMAT = '%s - "%s %s HTTP/%s" %d'  # uvicorn's access-log message
SECRET_PATH = "/events?topic=a&token=abc123&access_token=x"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Undo configure_logging: root handler and level, uvicorn loggers, structlog."""
    root = logging.getLogger()
    root_level = root.level
    root_handlers = list(root.handlers)
    saved = {
        name: (
            list(logging.getLogger(name).handlers),
            list(logging.getLogger(name).filters),
            logging.getLogger(name).propagate,
            logging.getLogger(name).level,
        )
        for name in UVICORN_LOGGERS
    }
    structlog_configured = structlog.is_configured()
    structlog_config = structlog.get_config()
    yield
    # Only remove what configure_logging added: pytest swaps its own capture handlers
    # on the root logger between the setup, call and teardown phases.
    for handler in list(root.handlers):
        if handler not in root_handlers and type(handler).__module__ == "ssehub._logging":
            root.removeHandler(handler)
            handler.close()
    root.setLevel(root_level)
    for name, (handlers, filters, propagate, level) in saved.items():
        named = logging.getLogger(name)
        named.handlers[:] = handlers
        named.filters[:] = filters
        named.propagate = propagate
        named.setLevel(level)
    structlog.reset_defaults()
    if structlog_configured:
        structlog.configure(**structlog_config)


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = text.splitlines()
    assert lines, "nothing was logged"
    return [json.loads(line) for line in lines]


def log_uvicorn_access(path: str = SECRET_PATH, status: int = 200) -> None:
    logging.getLogger("uvicorn.access").info(
        ACCESS_FORMAT, "127.0.0.1:5000", "GET", path, "1.1", status
    )


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_json_lines_from_stdlib_and_structlog() -> None:
    out = io.StringIO()
    configure_logging(fmt="json", stream=out)
    logging.getLogger("ssehub.hub").info(
        "published %d events", 3, extra={"topic": "news", "head_id": 41}
    )
    access_logger().info("stream closed", topic="news", reason="slow", events=12)

    first, second = json_lines(out.getvalue())
    assert first["event"] == "published 3 events"
    assert first["level"] == "info"
    assert first["logger"] == "ssehub.hub"
    assert first["topic"] == "news"
    assert first["head_id"] == 41
    assert second["event"] == "stream closed"
    assert second["level"] == "info"
    assert second["logger"] == "ssehub.access"
    assert second["topic"] == "news"
    assert second["reason"] == "slow"
    assert second["events"] == 12
    for line in (first, second):
        stamp = datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00"))
        assert stamp.utcoffset() is not None
        assert "_record" not in line
        assert "_from_structlog" not in line


def test_default_stream_is_current_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(fmt="json")
    logging.getLogger("ssehub.hub").warning("draining", extra={"grace": 5.0})
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = json_lines(captured.err)
    assert line["event"] == "draining"
    assert line["level"] == "warning"
    assert line["grace"] == 5.0


def test_uvicorn_access_record_is_redacted_and_structured() -> None:
    out = io.StringIO()
    configure_logging(fmt="json", stream=out)
    log_uvicorn_access()
    text = out.getvalue()
    assert "abc123" not in text
    assert "access_token=x" not in text
    (line,) = json_lines(text)
    assert line["logger"] == "uvicorn.access"
    assert line["event"] == (
        '127.0.0.1:5000 - "GET /events?topic=a&token=***&access_token=*** HTTP/1.1" 200'
    )
    assert line["path"] == "/events?topic=a&token=***&access_token=***"
    assert line["method"] == "GET"
    assert line["status_code"] == 200
    assert line["client_addr"] == "127.0.0.1:5000"


def test_uvicorn_access_redacted_in_console_format() -> None:
    out = io.StringIO()
    configure_logging(fmt="console", stream=out)
    log_uvicorn_access()
    text = out.getvalue()
    assert "topic=a" in text
    assert "abc123" not in text
    assert "access_token=x" not in text
    assert "token=***" in text


def test_filter_is_installed_on_uvicorn_access_and_rewrites_records() -> None:
    configure_logging(fmt="json", stream=io.StringIO())
    access = logging.getLogger("uvicorn.access")
    filters = [f for f in access.filters if isinstance(f, RedactQueryFilter)]
    assert len(filters) == 1
    record = access.makeRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        ACCESS_FORMAT,
        ("127.0.0.1:5000", "GET", SECRET_PATH, "1.1", 200),
        None,
    )
    assert filters[0].filter(record) is True
    message = record.getMessage()
    assert "abc123" not in message
    assert "topic=a&token=***&access_token=***" in message


def test_filter_redacts_free_text_and_mapping_args() -> None:
    redact = RedactQueryFilter()
    record = logging.LogRecord(
        "ssehub.hub", logging.INFO, __file__, 1, "calling /hook?key=k1 now", None, None
    )
    assert redact.filter(record)
    assert record.getMessage() == "calling /hook?key=*** now"

    record = logging.LogRecord(
        "ssehub.hub",
        logging.INFO,
        __file__,
        1,
        "got %(url)s (%(n)d)",
        ({"url": "http://h/p?password=hunter2&q=1", "n": 2},),
        None,
    )
    assert redact.filter(record)
    assert record.getMessage() == "got http://h/p?password=***&q=1 (2)"

    record = logging.LogRecord(
        "ssehub.hub", logging.INFO, __file__, 1, "no query here %s", ("plain",), None
    )
    assert redact.filter(record)
    assert record.getMessage() == "no query here plain"


def test_structlog_fields_with_secrets_are_redacted() -> None:
    out = io.StringIO()
    configure_logging(fmt="json", stream=out)
    access_logger().info("request", path="/topics/a/events?jwt=eyJ.x.y&since=3", status=200)
    logging.getLogger("ssehub.hub").info("plain", extra={"url": "/p?session=s1"})
    first, second = json_lines(out.getvalue())
    assert first["path"] == "/topics/a/events?jwt=***&since=3"
    assert second["url"] == "/p?session=***"
    assert "eyJ" not in out.getvalue()


def test_configure_twice_does_not_duplicate_output() -> None:
    out = io.StringIO()
    configure_logging(fmt="json", stream=out)
    configure_logging(fmt="json", stream=out)
    logging.getLogger("ssehub.hub").info("once")
    access_logger().info("once too")
    log_uvicorn_access()
    lines = json_lines(out.getvalue())
    assert [line["event"] for line in lines][:2] == ["once", "once too"]
    assert len(lines) == 3
    ours = [h for h in logging.getLogger().handlers if type(h).__module__ == "ssehub._logging"]
    assert len(ours) == 1
    access = logging.getLogger("uvicorn.access")
    assert sum(isinstance(f, RedactQueryFilter) for f in access.filters) == 1


def test_reconfigure_switches_format_and_stream() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(fmt="json", stream=first)
    configure_logging(fmt="console", stream=second)
    logging.getLogger("ssehub.hub").info("hello", extra={"topic": "t"})
    assert first.getvalue() == ""
    text = second.getvalue()
    assert "hello" in text
    assert "topic=t" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_auto_format_follows_the_terminal() -> None:
    piped, terminal = io.StringIO(), FakeTTY()
    configure_logging(fmt="auto", stream=piped)
    logging.getLogger("ssehub.hub").info("to a pipe", extra={"n": 1})
    configure_logging(fmt="auto", stream=terminal)
    logging.getLogger("ssehub.hub").info("to a person", extra={"n": 2})
    (line,) = json_lines(piped.getvalue())
    assert line["event"] == "to a pipe"
    text = terminal.getvalue()
    assert "to a person" in text
    assert not text.lstrip().startswith("{")


def test_level_filters_stdlib_and_structlog() -> None:
    out = io.StringIO()
    configure_logging(level="warning", fmt="json", stream=out)
    logging.getLogger("ssehub.hub").info("quiet")
    access_logger().info("quiet too")
    logging.getLogger("ssehub.hub").warning("loud")
    logging.getLogger("ssehub.access").error("loud too")
    assert [line["event"] for line in json_lines(out.getvalue())] == ["loud", "loud too"]


def test_debug_level_and_case_insensitive_names() -> None:
    out = io.StringIO()
    configure_logging(level="DEBUG", fmt="json", stream=out)
    logging.getLogger("ssehub.hub").debug("details")
    logging.getLogger("ssehub.access").debug("details too")
    assert [line["level"] for line in json_lines(out.getvalue())] == ["debug", "debug"]


def test_trace_level_as_uvicorn_names_it() -> None:
    out = io.StringIO()
    configure_logging(level="trace", fmt="json", stream=out)
    logging.getLogger("uvicorn.error").log(5, "ASGI call")
    (line,) = json_lines(out.getvalue())
    assert line["event"] == "ASGI call"


def test_unknown_level_or_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log level"):
        configure_logging(level="chatty")
    with pytest.raises(ValueError, match="log format"):
        configure_logging(fmt="xml")  # type: ignore[arg-type]


def test_exceptions_are_rendered_in_json() -> None:
    out = io.StringIO()
    configure_logging(fmt="json", stream=out)
    try:
        raise RuntimeError("backend fell over")
    except RuntimeError:
        logging.getLogger("ssehub.hub").exception("publish failed")
    (line,) = json_lines(out.getvalue())
    assert line["level"] == "error"
    assert "RuntimeError: backend fell over" in line["exception"]
    assert line["exception"].startswith("Traceback")


def test_uvicorn_loggers_propagate_to_the_root_handler() -> None:
    stray = io.StringIO()
    error_logger = logging.getLogger("uvicorn.error")
    error_logger.addHandler(logging.StreamHandler(stray))
    error_logger.propagate = False
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)  # as uvicorn's own config
    out = io.StringIO()
    configure_logging(fmt="json", stream=out)
    error_logger.info(
        "Uvicorn running on %s", "http://127.0.0.1:8000", extra={"color_message": "\x1b[1m"}
    )
    log_uvicorn_access(status=204)
    assert stray.getvalue() == ""
    running, access = json_lines(out.getvalue())
    assert running["event"] == "Uvicorn running on http://127.0.0.1:8000"
    assert running["logger"] == "uvicorn.error"
    assert "color_message" not in running
    assert access["logger"] == "uvicorn.access"
    assert access["status_code"] == 204


def test_access_lines_go_through_the_stdlib_logger(caplog: pytest.LogCaptureFixture) -> None:
    """Embedded hubs must not print: access lines follow the app's logging config."""
    with caplog.at_level(logging.WARNING, logger="ssehub.access"):
        access_logger().info("stream.open", topics=["a"], client="1.2.3.4:5")
    assert caplog.records == []
    with caplog.at_level(logging.INFO, logger="ssehub.access"):
        access_logger().info("stream.open", topics=["a"], client="1.2.3.4:5")
    [record] = caplog.records
    assert record.name == "ssehub.access"
    assert record.getMessage() == "stream.open"
    assert record.topics == ["a"]  # type: ignore[attr-defined]
    assert record.client == "1.2.3.4:5"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param("/events", "/events", id="no-query"),
        pytest.param("", "", id="empty"),
        pytest.param("?", "?", id="bare-question-mark"),
        pytest.param("/events?topic=a", "/events?topic=a", id="harmless"),
        pytest.param("/events?token=abc", "/events?token=***", id="token"),
        pytest.param("/e?TOKEN=abc&Api_Key=k", "/e?TOKEN=***&Api_Key=***", id="case"),
        pytest.param("/e?token=&topic=a", "/e?token=&topic=a", id="empty-value"),
        pytest.param("/e?token&topic=a", "/e?token&topic=a", id="no-value"),
        pytest.param("/e?topic=&x=1", "/e?topic=&x=1", id="empty-harmless"),
        pytest.param("/e?token=a&topic=t&token=b", "/e?token=***&topic=t&token=***", id="repeated"),
        pytest.param("/e?%74oken=abc", "/e?%74oken=***", id="encoded-name"),
        pytest.param("/e?access%5Ftoken=abc", "/e?access%5Ftoken=***", id="encoded-underscore"),
        pytest.param("/e?%2574oken=abc", "/e?%2574oken=***", id="double-encoded"),
        pytest.param("/e?api+key=abc", "/e?api+key=***", id="plus-space"),
        pytest.param("/e?topic=a%26token%3Dz", "/e?topic=a%26token%3Dz", id="encoded-value"),
        pytest.param("/e?token=a=b=c&x=1", "/e?token=***&x=1", id="equals-in-value"),
        pytest.param("/e?a=1;session=s", "/e?a=1;session=***", id="semicolon"),
        pytest.param("/e?a=1&&token=t&", "/e?a=1&&token=***&", id="stray-ampersands"),
        pytest.param("/e?token=t#frag", "/e?token=***#frag", id="fragment"),
        pytest.param("/e?a=1#access_token=t", "/e?a=1#access_token=***", id="fragment-pairs"),
        pytest.param("/e#code=c", "/e#code=***", id="fragment-only"),
        pytest.param("/e?next=/x?token=t", "/e?next=/x?token=***", id="nested-question"),
        pytest.param(
            "https://u:p@h:8443/p?client_secret=s&state=q",
            "https://u:p@h:8443/p?client_secret=***&state=q",
            id="absolute",
        ),
        pytest.param(
            "/e?signature=s&passwd=p&credentials=c&auth=a",
            "/e?signature=***&passwd=***&credentials=***&auth=***",
            id="other-names",
        ),
        pytest.param("/e?%zz=1&token=%zz", "/e?%zz=1&token=***", id="bad-escapes"),
        pytest.param("/é?token=ü&tökén=ü", "/é?token=***&tökén=ü", id="non-ascii"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    "odd",
    [
        "?&&&",
        "?=",
        "?=x",
        "??token=a",
        "#",
        "?#?#",
        "\x00?token=\x00",
        "%" * 50 + "?" + "&" * 50,
        "/x" + "?a=" * 5000 + "?token=a",
        "?" + "%25" * 1000 + "74oken=a",
    ],
)
def test_redact_url_never_raises(odd: str) -> None:
    result = redact_url(odd)
    assert isinstance(result, str)
    assert "token=a" not in result


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


ACCESS_FIELDS: dict[str, Any] = {
    "topics": ["a", "b"],
    "client": "127.0.0.1:5000",
    "resume_from": None,
    "path": "/events?topic=a&token=abc123",
    "duration_s": 1.25,
    "bytes": 99,
}


@contextlib.contextmanager
def only_our_handler() -> Iterator[None]:
    """Take pytest's capture handlers (added for each test phase) off the root logger,
    so the handler configure_logging added is the only output, as under ssehub serve."""
    root = logging.getLogger()
    others = [h for h in root.handlers if type(h).__module__ != "ssehub._logging"]
    for handler in others:
        root.removeHandler(handler)
    try:
        yield
    finally:
        for handler in others:
            root.addHandler(handler)


def test_access_lines_written_directly_match_the_record_path() -> None:
    """configure_logging writes access lines straight to its handler (no LogRecord)
    while nothing else would see them; a filter on the way makes them take the record
    path instead, and the line must not change."""
    out = io.StringIO()
    configure_logging(fmt="json", stream=out)
    made: list[logging.LogRecord] = []
    factory = logging.getLogRecordFactory()

    def counting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        made.append(factory(*args, **kwargs))
        return made[-1]

    seen: list[logging.LogRecord] = []

    def spy(record: logging.LogRecord) -> bool:
        seen.append(record)
        return True

    access = logging.getLogger("ssehub.access")
    with only_our_handler():
        logging.setLogRecordFactory(counting_factory)
        try:
            access_logger().info("stream.close", **ACCESS_FIELDS)
            assert made == []  # written directly
            access.addFilter(spy)
            access_logger().info("stream.close", **ACCESS_FIELDS)
        finally:
            access.removeFilter(spy)
            logging.setLogRecordFactory(factory)
    assert made == seen and len(seen) == 1  # the second line was a record
    assert "abc123" not in out.getvalue()
    direct, through_record = lines = json_lines(out.getvalue())
    for line in lines:
        datetime.fromisoformat(line.pop("timestamp").replace("Z", "+00:00"))
    assert direct == through_record
    assert direct["path"] == "/events?topic=a&token=***"
    assert direct["logger"] == "ssehub.access" and direct["level"] == "info"
    assert direct["topics"] == ["a", "b"] and direct["resume_from"] is None


def test_access_lines_reach_handlers_added_after_configure() -> None:
    out = io.StringIO()
    configure_logging(fmt="json", stream=out)
    extra = Collect()
    with only_our_handler():
        logging.getLogger().addHandler(extra)
        try:
            access_logger().info("stream.open", topics=["a"], client="1.2.3.4:5")
        finally:
            logging.getLogger().removeHandler(extra)
    [record] = extra.records
    assert record.getMessage() == "stream.open"
    assert record.topics == ["a"]  # type: ignore[attr-defined]
    (line,) = json_lines(out.getvalue())
    assert line["event"] == "stream.open" and line["client"] == "1.2.3.4:5"


def test_access_lines_follow_the_level_of_the_handler() -> None:
    out = io.StringIO()
    configure_logging(fmt="json", stream=out)
    (ours,) = [h for h in logging.getLogger().handlers if type(h).__module__ == "ssehub._logging"]
    ours.setLevel(logging.WARNING)
    with only_our_handler():
        access_logger().info("stream.open", topics=["a"], client="1.2.3.4:5")
        logging.getLogger("ssehub.hub").warning("draining")
    assert [line["event"] for line in json_lines(out.getvalue())] == ["draining"]


def test_access_lines_respect_the_access_log_switch() -> None:
    out = io.StringIO()
    configure_logging(fmt="json", stream=out, access_log=False)
    access_logger().info("stream.open", topics=["a"], client="1.2.3.4:5")
    logging.getLogger("ssehub.hub").info("still here")
    assert [line["event"] for line in json_lines(out.getvalue())] == ["still here"]


def test_bound_context_variables_reach_every_json_line() -> None:
    out = io.StringIO()
    configure_logging(fmt="json", stream=out)
    structlog.contextvars.bind_contextvars(node="n1", hint="/x?token=t0k")
    try:
        with only_our_handler():
            access_logger().info("stream.open", topics=["a"], client="1.2.3.4:5")
        logging.getLogger("ssehub.hub").info("plain")
        structlog.get_logger("ssehub.test").info("from structlog")
    finally:
        structlog.contextvars.clear_contextvars()
    lines = json_lines(out.getvalue())
    assert [line["event"] for line in lines] == ["stream.open", "plain", "from structlog"]
    assert all(line["node"] == "n1" for line in lines), lines
    assert all(line["hint"] == "/x?token=***" for line in lines), lines


async def test_access_lines_of_a_loop_step_are_written_together_in_order() -> None:
    """Under a running loop, direct access lines wait for the end of the loop's step (one
    write for all of them); a line through the record path writes them first, so the
    order never changes; and nothing waits past the step."""
    out = io.StringIO()
    configure_logging(fmt="json", stream=out)

    def events() -> list[str]:
        return [line["event"] for line in json_lines(out.getvalue())] if out.getvalue() else []

    with only_our_handler():
        access_logger().info("stream.open", topics=["a"], client="1.2.3.4:5")
        access_logger().info("stream.close", topics=["a"], client="1.2.3.4:5")
        assert events() == []
        logging.getLogger("ssehub.hub").info("published")
        assert events() == ["stream.open", "stream.close", "published"]
        access_logger().info("stream.open", topics=["b"], client="1.2.3.4:6")
        await asyncio.sleep(0)  # the end of this step
        assert events() == ["stream.open", "stream.close", "published", "stream.open"]
        access_logger().info("stream.refused", topics=["c"], client="1.2.3.4:7")
        assert events()[-1] == "stream.open"
        configure_logging(fmt="json", stream=io.StringIO())  # the old handler writes all
        assert events()[-1] == "stream.refused"
