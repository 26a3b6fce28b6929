"""Tests for the ``text/event-stream`` encoder and the sans-IO decoder in ``ssehub._wire``."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ssehub._wire import (
    ServerEvent,
    SSEDecoder,
    encode_comment,
    encode_event,
    encode_retry,
    iter_events,
)

E = ServerEvent


def decode(chunks: Sequence[bytes]) -> list[ServerEvent]:
    decoder = SSEDecoder()
    events: list[ServerEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.flush())
    return events


# --------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Enc:
    data: str | None = None
    id: str | None = None
    event: str | None = None
    retry: int | None = None


ENCODE_CASES: list[tuple[str, Enc, bytes]] = [
    ("data only", Enc("x"), b"data: x\n\n"),
    ("field order", Enc("x", id="1", event="tick"), b"id: 1\nevent: tick\ndata: x\n\n"),
    (
        "all fields",
        Enc("x", id="1", event="tick", retry=5),
        b"id: 1\nevent: tick\ndata: x\nretry: 5\n\n",
    ),
    ("retry zero", Enc("x", retry=0), b"data: x\nretry: 0\n\n"),
    ("empty data", Enc(""), b"data: \n\n"),
    ("no data", Enc(id="7"), b"id: 7\n\n"),
    ("nothing", Enc(), b"\n"),
    ("empty id", Enc("x", id=""), b"id: \ndata: x\n\n"),
    ("LF", Enc("a\nb"), b"data: a\ndata: b\n\n"),
    ("CRLF", Enc("a\r\nb"), b"data: a\ndata: b\n\n"),
    ("CR", Enc("a\rb"), b"data: a\ndata: b\n\n"),
    ("LF CR is two breaks", Enc("a\n\rb"), b"data: a\ndata: \ndata: b\n\n"),
    ("blank payload line", Enc("a\n\nb"), b"data: a\ndata: \ndata: b\n\n"),
    ("trailing break", Enc("a\r\n"), b"data: a\ndata: \n\n"),
    ("leading space kept", Enc(" a"), b"data:  a\n\n"),
    ("U+2028 kept", Enc("a\u2028b"), "data: a\u2028b\n\n".encode()),
    ("U+2029 and U+0085 kept", Enc("a\u2029b\x85c"), "data: a\u2029b\x85c\n\n".encode()),
    ("VT FF FS kept", Enc("a\x0bb\x0cc\x1cd"), b"data: a\x0bb\x0cc\x1cd\n\n"),
    (
        "non-ASCII as UTF-8",
        Enc("caf\u00e9", event="\u20ac"),
        b"event: \xe2\x82\xac\ndata: caf\xc3\xa9\n\n",
    ),
]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [case[1:] for case in ENCODE_CASES],
    ids=[case[0] for case in ENCODE_CASES],
)
def test_encode_event(fields: Enc, expected: bytes) -> None:
    encoded = encode_event(fields.data, id=fields.id, event=fields.event, retry=fields.retry)
    assert encoded == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hi", b": hi\n\n"),
        ("", b":\n\n"),
        ("a\nb", b": a\n: b\n\n"),
        ("a\r\nb\rc", b": a\n: b\n: c\n\n"),
        ("a\n\nb", b": a\n:\n: b\n\n"),
        ("x\u2028y", ": x\u2028y\n\n".encode()),
    ],
)
def test_encode_comment(text: str, expected: bytes) -> None:
    assert encode_comment(text) == expected


def test_encode_comment_default_is_empty_comment() -> None:
    assert encode_comment() == b":\n\n"


@pytest.mark.parametrize(("retry", "expected"), [(0, b"retry: 0\n\n"), (3000, b"retry: 3000\n\n")])
def test_encode_retry(retry: int, expected: bytes) -> None:
    assert encode_retry(retry) == expected


@pytest.mark.parametrize("field", ["id", "event"])
@pytest.mark.parametrize("bad", ["a\rb", "a\nb", "a\r\n", "\x00", "x\x00y"])
def test_encode_refuses_line_breaks_and_nul(field: str, bad: str) -> None:
    with pytest.raises(ValueError, match=field):
        if field == "id":
            encode_event("x", id=bad)
        else:
            encode_event("x", event=bad)


def test_encode_refuses_negative_retry() -> None:
    with pytest.raises(ValueError, match="retry"):
        encode_event("x", retry=-1)
    with pytest.raises(ValueError, match="retry"):
        encode_retry(-1)


def test_encoded_comments_and_retry_are_not_events() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(encode_comment("a\nb") + encode_retry(1234)) == []
    assert decoder.retry == 1234
    assert decoder.feed(encode_event("x")) == [E("x", retry=1234)]


# --------------------------------------------------------------------------------------
# Decoder
# --------------------------------------------------------------------------------------

BOM = b"\xef\xbb\xbf"

DECODE_CASES: list[tuple[str, list[bytes], list[ServerEvent]]] = [
    # line ends
    ("LF", [b"data: a\ndata: b\n\n"], [E("a\nb")]),
    ("CRLF", [b"data: a\r\ndata: b\r\n\r\n"], [E("a\nb")]),
    ("CR", [b"data: a\rdata: b\r\r"], [E("a\nb")]),
    ("mixed", [b"data: a\r\ndata: b\rdata: c\n\r\n"], [E("a\nb\nc")]),
    ("LF CR is two line ends", [b"data: a\n\rdata: b\n\n"], [E("a"), E("b")]),
    ("several events in one chunk", [b"data: a\n\ndata: b\n\n"], [E("a"), E("b")]),
    ("CR | LF across chunks", [b"data: a\r", b"\ndata: b\r\n\r\n"], [E("a\nb")]),
    ("CR | LF blank line across chunks", [b"data: a\r\n\r", b"\ndata: b\n\n"], [E("a"), E("b")]),
    ("CR | empty | LF across chunks", [b"data: a\r", b"", b"\n", b"data: b\n\n"], [E("a\nb")]),
    ("CR | LF-only chunk", [b"data: a\r", b"\n", b"\n"], [E("a")]),
    ("CR | CR across chunks", [b"data: a\r", b"\r"], [E("a")]),
    ("line split across chunks", [b"da", b"ta: ", b"a", b"b\n", b"\n"], [E("ab")]),
    # BOM
    ("BOM skipped", [BOM + b"data: a\n\n"], [E("a")]),
    ("BOM split across chunks", [b"\xef", b"\xbb", b"\xbfdata: a\n\n"], [E("a")]),
    ("BOM alone then data", [BOM, b"data: a\n\n"], [E("a")]),
    ("second BOM not skipped", [BOM + BOM + b"data: a\n\ndata: b\n\n"], [E("b")]),
    ("BOM on later line not skipped", [b"data: a\n\n" + BOM + b"data: b\n\n"], [E("a")]),
    ("BOM in value kept", [b"data: " + BOM + b"x\n\n"], [E("\ufeffx")]),
    ("BOM prefix then other bytes", [b"\xef", b"data: a\n\n"], []),
    # comments
    ("comments ignored", [b": hello\ndata: a\n:\n: x: y\ndata: b\n\n"], [E("a\nb")]),
    ("comment-only block", [b": ping\n\n"], []),
    # retry
    ("retry", [b"retry: 1500\ndata: a\n\n"], [E("a", retry=1500)]),
    ("retry with letters ignored", [b"retry: 12a\ndata: a\n\n"], [E("a")]),
    ("retry empty ignored", [b"retry:\ndata: a\n\n"], [E("a")]),
    ("retry negative ignored", [b"retry: -5\ndata: a\n\n"], [E("a")]),
    ("retry two spaces ignored", [b"retry:  12\ndata: a\n\n"], [E("a")]),
    ("retry non-ASCII digits ignored", ["retry: \u0661\u0662\ndata: a\n\n".encode()], [E("a")]),
    ("retry superscript ignored", ["retry: 1\u00b2\ndata: a\n\n".encode()], [E("a")]),
    ("retry leading zeros", [b"retry: 007\ndata: a\n\n"], [E("a", retry=7)]),
    ("retry last wins", [b"retry: 1\nretry: 2\nretry: x\ndata: a\n\n"], [E("a", retry=2)]),
    (
        "retry reported once",
        [b"retry: 10\ndata: a\n\ndata: b\n\n"],
        [E("a", retry=10), E("b")],
    ),
    (
        "retry in data-less block kept for next dispatch",
        [b"retry: 10\n\ndata: a\n\ndata: b\n\n"],
        [E("a", retry=10), E("b")],
    ),
    # id
    ("id", [b"id: 1\ndata: a\n\n"], [E("a", id="1")]),
    (
        "id with NUL ignored",
        [b"id: 1\ndata: a\n\nid: 2\x00x\ndata: b\n\n"],
        [E("a", id="1"), E("b", id="1")],
    ),
    (
        "id persists",
        [b"id: 1\ndata: a\n\ndata: b\n\nid: 2\ndata: c\n\n"],
        [E("a", id="1"), E("b", id="1"), E("c", id="2")],
    ),
    (
        "empty id resets",
        [b"id: 1\ndata: a\n\nid:\ndata: b\n\ndata: c\n\n"],
        [E("a", id="1"), E("b", id=""), E("c", id="")],
    ),
    ("id without colon resets", [b"id: 1\n\nid\ndata: b\n\n"], [E("b", id="")]),
    ("id-only block sets id", [b"id: 9\n\ndata: a\n\n"], [E("a", id="9")]),
    ("id keeps spaces", [b"id:  1 \ndata: a\n\n"], [E("a", id=" 1 ")]),
    # data
    ("empty data dispatched", [b"data:\n\n"], [E("")]),
    ("empty data with space", [b"data: \n\n"], [E("")]),
    ("two empty data lines", [b"data:\ndata:\n\n"], [E("\n")]),
    ("no data no dispatch", [b"event: x\nid: 1\n\n"], []),
    ("blank lines only", [b"\n\n\r\n\r\r"], []),
    ("event type reset by empty block", [b"event: x\n\ndata: a\n\n"], [E("a")]),
    ("one space stripped", [b"data:  x\n\n"], [E(" x")]),
    ("no space", [b"data:x\n\n"], [E("x")]),
    ("trailing space kept", [b"data: x \n\n"], [E("x ")]),
    ("tab not stripped", [b"data:\tx\n\n"], [E("\tx")]),
    ("colon in value", [b"data: a:b\n\n"], [E("a:b")]),
    ("field without colon", [b"data\n\n"], [E("")]),
    ("field without colon appends", [b"data: a\ndata\ndata: b\n\n"], [E("a\n\nb")]),
    # event
    ("event type", [b"event: tick\ndata: a\n\n"], [E("a", event="tick")]),
    ("empty event is message", [b"event:\ndata: a\n\n"], [E("a")]),
    ("event without colon", [b"event: x\nevent\ndata: a\n\n"], [E("a")]),
    ("event last wins", [b"event: x\nevent: y\ndata: a\n\n"], [E("a", event="y")]),
    (
        "event type does not persist",
        [b"event: x\ndata: a\n\ndata: b\n\n"],
        [E("a", event="x"), E("b")],
    ),
    # unknown fields
    ("unknown fields ignored", [b"foo: bar\nDATA: b\n data: c\ndata: a\n\n"], [E("a")]),
    # end of stream
    ("unterminated event discarded", [b"data: a\n\ndata: b\n"], [E("a")]),
    ("unterminated line discarded", [b"data: a\n\ndata: b"], [E("a")]),
    ("trailing CR ends a line only", [b"data: a\n\ndata: b\r"], [E("a")]),
    # text decoding
    ("UTF-8 split 3-byte", [b"data: \xe2\x82", b"\xac\n\n"], [E("\u20ac")]),
    ("UTF-8 split 4-byte", [b"data: \xf0", b"\x9f\x98", b"\x80!\n\n"], [E("\U0001f600!")]),
    ("UTF-8 split in event", [b"event: \xc3", b"\xa9\ndata: a\n\n"], [E("a", event="\u00e9")]),
    ("UTF-8 split in id", [b"id: \xc3", b"\xa9\ndata: a\n\n"], [E("a", id="\u00e9")]),
    ("invalid UTF-8 replaced", [b"data: \xff\xe2\x82\n\n"], [E("\ufffd\ufffd")]),
    ("truncated char before break", [b"data: \xe2\x82\ndata: x\n\n"], [E("\ufffd\nx")]),
    ("NUL in data kept", [b"data: a\x00b\n\n"], [E("a\x00b")]),
    (
        "U+2028 not a line break",
        ["data: a\u2028b\u2029c\x85d\n\n".encode()],
        [E("a\u2028b\u2029c\x85d")],
    ),
    (
        "VT FF FS not line breaks",
        [b"data: a\x0bb\x0cc\x1cd\x1ee\n\n"],
        [E("a\x0bb\x0cc\x1cd\x1ee")],
    ),
]


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [case[1:] for case in DECODE_CASES],
    ids=[case[0] for case in DECODE_CASES],
)
def test_decode(chunks: list[bytes], expected: list[ServerEvent]) -> None:
    assert decode(chunks) == expected


def test_cr_lf_across_chunks_is_one_line_end_step_by_step() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    # The LF completes the CRLF started above; it must not be read as an empty line.
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"data: b\r") == []
    assert decoder.feed(b"\n\r") == [E("a\nb")]
    assert decoder.feed(b"\ndata: c\n") == []
    assert decoder.feed(b"\n") == [E("c")]


def test_events_returned_by_the_chunk_that_completes_them() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n") == []
    assert decoder.feed(b"\ndata: b\n\ndata: c\n\nda") == [E("a"), E("b"), E("c")]
    assert decoder.feed(b"ta: d\n\n") == [E("d")]


def test_last_event_id_is_committed_at_blank_line() -> None:
    decoder = SSEDecoder()
    assert decoder.last_event_id == ""
    assert decoder.feed(b"id: 5\n") == []
    assert decoder.last_event_id == ""
    assert decoder.feed(b"\n") == []
    assert decoder.last_event_id == "5"
    assert decoder.feed(b"id: 6\ndata: x\n") == []
    assert decoder.flush() == []
    assert decoder.last_event_id == "5"


def test_last_event_id_seed() -> None:
    decoder = SSEDecoder(last_event_id="41")
    assert decoder.last_event_id == "41"
    assert decoder.feed(b"data: a\n\nid: 42\ndata: b\n\n") == [E("a", id="41"), E("b", id="42")]
    assert decoder.last_event_id == "42"


def test_retry_property_tracks_latest_valid_value() -> None:
    decoder = SSEDecoder()
    assert decoder.retry is None
    decoder.feed(b"retry: 100\n\n")
    assert decoder.retry == 100
    decoder.feed(b"retry: 2x\n\nretry: \n\n")
    assert decoder.retry == 100
    decoder.feed(b"retry: 0\n")
    assert decoder.retry == 0


def test_huge_retry_is_ignored_not_raised() -> None:
    stream = b"retry: 5\nretry: " + b"9" * 10_000 + b"\ndata: a\n\n"
    decoder = SSEDecoder()
    assert decoder.feed(stream) == [E("a", retry=5)]
    assert decoder.retry == 5


def test_flush_discards_pending_and_starts_a_new_stream() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"id: 3\n\nevent: x\nid: 4\ndata: a\nretry: 9\ndata: par") == []
    assert decoder.flush() == []
    # Neither the half-built event nor the unterminated line survive the flush...
    assert decoder.feed(b"tial\n\n") == []
    assert decoder.flush() == []
    # ...nor the uncommitted "id: 4"; each new stream may start with a BOM again, and the
    # last event ID string persists.
    assert decoder.feed(BOM + b"data: b\n\n") == [E("b", id="3")]
    assert decoder.retry == 9


def test_iter_events() -> None:
    chunks = iter([b"id: 1\r", b"\ndata: a\r", b"\n\r\n", b"data: b\n\n", b"data: c"])
    assert list(iter_events(chunks)) == [E("a", id="1"), E("b", id="1")]


def test_server_event_defaults_and_immutability() -> None:
    event = ServerEvent("x")
    assert (event.data, event.event, event.id, event.retry) == ("x", "message", "", None)
    with pytest.raises(AttributeError):
        event.data = "y"  # type: ignore[misc]


# --------------------------------------------------------------------------------------
# Chunking invariance
# --------------------------------------------------------------------------------------

SAMPLE_STREAM = (
    BOM
    + b": comment\r\n"
    + b"retry: 2500\r\n"
    + b"id: 1\r\n"
    + b"event: tick\r\n"
    + b"data: first\r\n"
    + b"data:  second\r\n"
    + b"\r\n"
    + b"data: \xe2\x82\xac uro\r"
    + b"data:x\r"
    + b"\r"
    + b"id: 2\n"
    + b"data\n"
    + b": another comment\n"
    + b"\n"
    + b"event: done\r"
    + b"data: caf\xc3\xa9 \xf0\x9f\x98\x80\r\n"
    + b"unknown: field\r\n"
    + b"\r\n"
    + b"data: never dispatched\r\n"
)
SAMPLE_EVENTS = [
    E("first\n second", event="tick", id="1", retry=2500),
    E("\u20ac uro\nx", id="1"),
    E("", id="2"),
    E("caf\u00e9 \U0001f600", event="done", id="2"),
]


def test_sample_stream_in_one_piece() -> None:
    assert decode([SAMPLE_STREAM]) == SAMPLE_EVENTS


@pytest.mark.parametrize("split", range(len(SAMPLE_STREAM) + 1))
def test_sample_stream_every_split_point(split: int) -> None:
    assert decode([SAMPLE_STREAM[:split], SAMPLE_STREAM[split:]]) == SAMPLE_EVENTS


def test_sample_stream_byte_by_byte() -> None:
    chunks = [SAMPLE_STREAM[i : i + 1] for i in range(len(SAMPLE_STREAM))]
    assert decode(chunks) == SAMPLE_EVENTS


# --------------------------------------------------------------------------------------
# Property: encode then decode round-trips under any chunking
# --------------------------------------------------------------------------------------

_NO_BREAK_OR_NUL = st.characters(codec="utf-8", exclude_characters="\r\n\x00")
_TRICKY = st.sampled_from(
    ["\r", "\n", "\r\n", "\n\r", "\u2028", "\u2029", "\x85", "\x00", " ", ":"]
)


@dataclass(frozen=True)
class Spec:
    data: str
    event: str | None
    id: str | None
    retry: int | None
    comment: str | None


specs = st.builds(
    Spec,
    data=st.lists(st.one_of(st.text(), _TRICKY)).map("".join),
    event=st.none() | st.text(_NO_BREAK_OR_NUL, min_size=1),
    id=st.none() | st.text(_NO_BREAK_OR_NUL),
    retry=st.none() | st.integers(min_value=0, max_value=2**63),
    comment=st.none() | st.text(),
)


def _normalise_breaks(text: str) -> str:
    return re.sub(r"\r\n|\r", "\n", text)


@settings(max_examples=200, deadline=None)
@given(event_specs=st.lists(specs, max_size=6), bom=st.booleans(), data=st.data())
def test_round_trip_under_arbitrary_chunking(
    event_specs: list[Spec], bom: bool, data: st.DataObject
) -> None:
    parts = [BOM] if bom else []
    expected: list[ServerEvent] = []
    last_id = ""
    for spec in event_specs:
        if spec.comment is not None:
            parts.append(encode_comment(spec.comment))
        parts.append(encode_event(spec.data, id=spec.id, event=spec.event, retry=spec.retry))
        if spec.id is not None:
            last_id = spec.id
        expected.append(
            ServerEvent(
                data=_normalise_breaks(spec.data),
                event=spec.event if spec.event is not None else "message",
                id=last_id,
                retry=spec.retry,
            )
        )
    stream = b"".join(parts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12), label="cuts"))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]

    decoder = SSEDecoder()
    events = [event for chunk in chunks for event in decoder.feed(chunk)]
    assert events == expected
    assert decoder.flush() == []
    assert decoder.last_event_id == last_id
    retries = [spec.retry for spec in event_specs if spec.retry is not None]
    assert decoder.retry == (retries[-1] if retries else None)
