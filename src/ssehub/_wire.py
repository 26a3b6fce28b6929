"""The ``text/event-stream`` wire format: an encoder and a sans-IO incremental decoder.

No I/O here: the server, the client and the load generator share this module, and it
can be tested (and fuzzed) with plain bytes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

__all__ = [
    "SSEDecoder",
    "ServerEvent",
    "encode_comment",
    "encode_event",
    "encode_retry",
    "iter_events",
]

_LINE_BREAK: Final = re.compile(r"\r\n|\r|\n")
_FORBIDDEN_IN_FIELD: Final = re.compile(r"[\r\n\x00]")
_LINE_BREAK_BYTES: Final = re.compile(rb"\r\n|\r|\n")
_BOM: Final = b"\xef\xbb\xbf"


def _check_field(name: str, value: str) -> None:
    if _FORBIDDEN_IN_FIELD.search(value):
        raise ValueError(f"SSE {name!r} must not contain CR, LF or NUL")


def _check_retry(retry: int) -> None:
    if retry < 0:
        raise ValueError("SSE 'retry' must be a non-negative integer")


def encode_event(
    data: str | None = None,
    *,
    id: str | None = None,
    event: str | None = None,
    retry: int | None = None,
) -> bytes:
    """Encode one event: ``id:``, ``event:``, ``data:`` (one line per payload line), ``retry:``.

    Payload line breaks (CRLF, CR, LF) each start a new ``data:`` line; other characters,
    U+2028 included, pass through. ``id`` and ``event`` must not contain CR, LF or NUL.
    """
    parts: list[str] = []
    if id is not None:
        _check_field("id", id)
        parts.append(f"id: {id}\n")
    if event is not None:
        _check_field("event", event)
        parts.append(f"event: {event}\n")
    if data is not None:
        for line in _LINE_BREAK.split(data):
            parts.append(f"data: {line}\n")
    if retry is not None:
        _check_retry(retry)
        parts.append(f"retry: {retry:d}\n")
    parts.append("\n")
    return "".join(parts).encode("utf-8")


def encode_comment(text: str = "") -> bytes:
    """Encode a comment (ignored by clients): ``: text``, one line per text line."""
    lines = "".join(f": {line}\n" if line else ":\n" for line in _LINE_BREAK.split(text))
    return f"{lines}\n".encode()


def encode_retry(retry_ms: int) -> bytes:
    """Encode a lone ``retry:`` field (sets the client's reconnection delay)."""
    _check_retry(retry_ms)
    return f"retry: {retry_ms:d}\n\n".encode("ascii")


@dataclass(frozen=True, slots=True)
class ServerEvent:
    """A dispatched event, as an ``EventSource`` client sees it."""

    data: str
    #: The event type: the last ``event:`` value of the block, ``"message"`` if none (or empty).
    event: str = "message"
    #: The last event ID string at dispatch time; it persists across events until changed.
    id: str = ""
    #: The reconnection time from a ``retry:`` field seen since the previous dispatch, if any.
    retry: int | None = None


class SSEDecoder:
    """Sans-IO incremental ``text/event-stream`` decoder (WHATWG HTML "Server-sent events").

    Feed it the response body in chunks of any size; it returns the events completed by
    each chunk. Lines end with CRLF, LF or CR (a CR ending one chunk and an LF starting the
    next are a single line end); a UTF-8 BOM at the very start of the stream is skipped;
    complete lines are decoded as UTF-8 with replacement characters. Only the new bytes of
    each chunk are scanned for line ends, so cost is linear in the stream size.

    ``last_event_id`` seeds the last event ID string (e.g. a resumed client's
    ``Last-Event-ID``). After :meth:`flush` the same decoder can read a new stream (a
    reconnection); the last event ID string and the reconnection time carry over.
    """

    __slots__ = (
        "_at_stream_start",
        "_bom_pending",
        "_data",
        "_event_type",
        "_id_buffer",
        "_last_event_id",
        "_line",
        "_pending_retry",
        "_retry",
        "_skip_lf",
    )

    def __init__(self, last_event_id: str = "") -> None:
        self._line = bytearray()  # bytes of the current, unterminated line
        self._bom_pending = b""  # bytes seen at stream start that may still be a BOM prefix
        self._skip_lf = False  # the previous chunk ended with CR: drop a leading LF
        self._data: list[bytes] = []  # raw values of this block's ``data:`` lines
        self._event_type = b""
        self._id_buffer = last_event_id  # the spec's "last event ID buffer"
        self._last_event_id = last_event_id  # the spec's "last event ID string"
        self._pending_retry: int | None = None
        self._retry: int | None = None
        self._at_stream_start = True

    def _start_stream(self) -> None:
        self._id_buffer = self._last_event_id  # an ID whose blank line never came is dropped
        self._line.clear()
        self._bom_pending = b""
        self._skip_lf = False
        self._data.clear()
        self._event_type = b""
        self._pending_retry = None
        self._at_stream_start = True

    @property
    def last_event_id(self) -> str:
        """The last event ID string (updated at each blank line, as a browser does)."""
        return self._last_event_id

    @property
    def retry(self) -> int | None:
        """The latest reconnection time (milliseconds) the stream asked for, if any."""
        return self._retry

    def feed(self, chunk: bytes) -> list[ServerEvent]:
        """Consume the next bytes of the stream; return the events they complete."""
        if self._at_stream_start:
            head = self._bom_pending + chunk
            if len(head) < len(_BOM) and _BOM.startswith(head):
                self._bom_pending = head  # could still be a BOM: wait for more bytes
                return []
            self._bom_pending = b""
            self._at_stream_start = False
            chunk = head[len(_BOM) :] if head.startswith(_BOM) else head
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[0] == 0x0A:
                chunk = chunk[1:]
                if not chunk:
                    return []
        # Only the new bytes are scanned; the last piece is the (possibly empty) unterminated
        # remainder of the chunk.
        pieces = _LINE_BREAK_BYTES.split(chunk) if b"\r" in chunk else chunk.split(b"\n")
        self._skip_lf = chunk[-1] == 0x0D
        if len(pieces) == 1:
            self._line += chunk
            return []
        events: list[ServerEvent] = []
        if self._line:
            self._line += pieces[0]
            pieces[0] = bytes(self._line)
            self._line.clear()
        self._line += pieces.pop()
        for line in pieces:
            self._process_line(line, events)
        return events

    def flush(self) -> list[ServerEvent]:
        """Signal the end of the stream.

        Per the spec, pending data is discarded: an unterminated line or an event whose
        blank line never arrived is not dispatched, so this returns ``[]``. The decoder is
        then ready for a new stream (a reconnection); :attr:`last_event_id` and
        :attr:`retry` are kept.
        """
        self._start_stream()
        return []

    def _process_line(self, line: bytes, events: list[ServerEvent]) -> None:
        if not line:
            self._dispatch(events)
            return
        colon = line.find(b":")
        if colon == 0:
            return  # comment
        if colon < 0:
            name, value = line, b""
        else:
            name, value = line[:colon], line[colon + 1 :]
            if value[:1] == b" ":
                value = value[1:]
        # Splitting the bytes at an ASCII ':' before decoding gives the same text as
        # decoding first: ':' never occurs inside a multi-byte UTF-8 sequence.
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event_type = value
        elif name == b"id":
            if b"\x00" not in value:
                self._id_buffer = value.decode("utf-8", "replace")
        elif name == b"retry":
            if value.isdigit():  # bytes.isdigit: non-empty and ASCII digits only
                try:
                    retry = int(value)
                except ValueError:  # beyond sys.get_int_max_str_digits(): hostile, ignore
                    return
                self._retry = self._pending_retry = retry
        # any other field is ignored

    def _dispatch(self, events: list[ServerEvent]) -> None:
        # The ID of an id-only block still takes effect at its blank line.
        self._last_event_id = self._id_buffer
        data = self._data
        event_type = self._event_type
        self._event_type = b""
        if not data:
            return
        self._data = []
        events.append(
            ServerEvent(
                data=b"\n".join(data).decode("utf-8", "replace"),
                event=event_type.decode("utf-8", "replace") if event_type else "message",
                id=self._last_event_id,
                retry=self._pending_retry,
            )
        )
        self._pending_retry = None


def iter_events(chunks: Iterable[bytes]) -> Iterator[ServerEvent]:
    """Decode a complete stream given as an iterable of byte chunks."""
    decoder = SSEDecoder()
    for chunk in chunks:
        yield from decoder.feed(chunk)
    yield from decoder.flush()
