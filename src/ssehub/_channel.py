"""Per-topic rings of encoded events, and subscriptions as cursors into them.

A :class:`Channel` keeps the most recent events of one topic in a fixed-size circular
buffer, each stored once with its wire bytes. A :class:`Subscription` holds one cursor
(a sequence number) per channel; publishing is O(1) plus waking the subscriptions that
wait, and a subscription's memory never grows with backlog. A cursor that falls behind
the ring's oldest entry is *lagging*: the slow-client policy decides what happens.

Nothing here awaits: wake-ups are plain callbacks (trio's sync-colour rule).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Sequence
from typing import Final

from ._models import Event

DEFAULT_RING_SIZE: Final = 1024
"""Events kept in memory per subscribed topic."""


class DisconnectReason(enum.Enum):
    """Why a subscription ended. ``value`` is the reason string used on the wire and in logs."""

    CLIENT_GONE = "client_gone"
    SLOW = "slow"
    STALLED = "stalled"
    SHUTDOWN = "shutdown"
    LIFETIME = "lifetime"
    OVERLOADED = "overloaded"
    ERROR = "error"
    RESYNC = "resync"

    @property
    def notify_client(self) -> bool:
        """Whether the client should get a final ``event: disconnect``."""
        return self in (
            DisconnectReason.SLOW,
            DisconnectReason.SHUTDOWN,
            DisconnectReason.LIFETIME,
            DisconnectReason.RESYNC,
        )


class Channel:
    """The ring of one topic's recent events.

    Entries have consecutive sequence numbers ``start <= seq < end``; an entry lives in
    slot ``seq % capacity``. ``floor`` is an id such that every event of this topic with
    a larger id that reached the hub is in the ring (or will be).
    """

    __slots__ = (
        "_chunks",
        "_events",
        "capacity",
        "end",
        "floor",
        "policy",
        "start",
        "subscribers",
        "topic",
    )

    def __init__(self, topic: str, capacity: int, floor: int, policy: str = "disconnect") -> None:
        self.topic = topic
        self.capacity = capacity
        self.floor = floor
        self.policy = policy
        """The slow-client policy of this topic: ``disconnect`` or ``latest``."""
        self.start = 0
        self.end = 0
        self._events: list[Event | None] = []
        self._chunks: list[bytes] = []
        self.subscribers: set[Subscription] = set()

    def __len__(self) -> int:
        return self.end - self.start

    def append(self, event: Event, chunk: bytes) -> None:
        """Store ``event`` (encoded as ``chunk``), evicting the oldest entry when full."""
        if self.end < self.capacity:
            self._events.append(event)
            self._chunks.append(chunk)
        else:
            slot = self.end % self.capacity
            if self.end - self.start == self.capacity:
                evicted = self._events[slot]
                assert evicted is not None
                self.floor = evicted.id
                self.start += 1
            self._events[slot] = event
            self._chunks[slot] = chunk
        self.end += 1

    def wake_all(self) -> None:
        for sub in self.subscribers:
            sub.wake()

    def event_at(self, seq: int) -> Event:
        event = self._events[seq % self.capacity]
        assert event is not None
        return event

    def chunk_at(self, seq: int) -> bytes:
        return self._chunks[seq % self.capacity]

    def seq_after(self, event_id: int) -> int:
        """The first sequence number whose event id is greater than ``event_id``."""
        lo, hi = self.start, self.end
        while lo < hi:
            mid = (lo + hi) // 2
            if self.event_at(mid).id <= event_id:
                lo = mid + 1
            else:
                hi = mid
        return lo


class Cursor:
    """A position in one channel: the sequence number of the next entry to deliver."""

    __slots__ = ("channel", "seq")

    def __init__(self, channel: Channel, seq: int) -> None:
        self.channel = channel
        self.seq = seq


class Lagged(Exception):
    """Internal signal: a cursor fell off its ring's tail."""

    def __init__(self, cursor: Cursor) -> None:
        super().__init__(cursor.channel.topic)
        self.cursor = cursor


class Subscription:
    """A set of cursors (one per topic) plus the little state a stream needs.

    Owned by one consumer (a stream response, a long-poll or ``Hub.subscribe``). The
    consumer waits with :meth:`wait`, takes what is pending with :meth:`take`, and
    releases the subscription through the broker when done.
    """

    __slots__ = (
        "_cursors",
        "_waiter",
        "bytes_sent",
        "close_reason",
        "events_sent",
        "ip",
        "opened_at",
        "peer",
        "position",
        "timer",
        "topics",
        "wrote",
    )

    def __init__(self, topics: Sequence[str], position: int, peer: str = "", ip: str = "") -> None:
        self.topics = tuple(topics)
        self.position = position
        """The id this subscription has delivered through (its resume point)."""
        self._cursors: list[Cursor] = []
        self._waiter: asyncio.Future[None] | None = None
        self.close_reason: DisconnectReason | None = None
        self.wrote = False
        self.peer = peer
        self.ip = ip
        self.opened_at = 0.0
        self.events_sent = 0
        self.bytes_sent = 0
        self.timer: asyncio.TimerHandle | None = None
        """The maximum-lifetime timer, if any."""

    def attach(self, channel: Channel, seq: int) -> None:
        self._cursors.append(Cursor(channel, seq))

    @property
    def channels(self) -> list[Channel]:
        return [c.channel for c in self._cursors]

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self, reason: DisconnectReason) -> None:
        """Ask the consumer to stop (first reason wins) and wake it."""
        if self.close_reason is None:
            self.close_reason = reason
        self.wake()

    def pending(self) -> bool:
        return any(c.seq != c.channel.end for c in self._cursors)

    async def wait(self) -> None:
        """Wait until something is pending or the subscription closes."""
        if self.close_reason is not None or self.pending():
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def take_one(self) -> tuple[Event, bytes] | None:
        """The event and its bytes when one event of one topic is all that is pending
        (the fan-out's common case, without the lists of :meth:`take`), else None and
        nothing taken."""
        if len(self._cursors) != 1:
            return None
        cursor = self._cursors[0]
        channel, seq = cursor.channel, cursor.seq
        if channel.end - seq != 1 or seq < channel.start:
            return None
        slot = seq % channel.capacity  # (same module: direct access to the ring)
        event = channel._events[slot]
        assert event is not None
        cursor.seq = seq + 1
        self.position = event.id
        return event, channel._chunks[slot]

    def take(self, limit: int) -> tuple[list[Event], list[bytes]]:
        """Everything pending (at most ``limit`` events), merged in id order.

        Raises :class:`Lagged` if a cursor fell behind its ring; the cursors are then
        left where they were so the caller can apply the slow-client policy.
        """
        if len(self._cursors) == 1:
            one = self.take_one()
            if one is not None:  # the common case: one new event
                return [one[0]], [one[1]]
            cursor = self._cursors[0]
            channel, seq = cursor.channel, cursor.seq
            if seq < channel.start:
                raise Lagged(cursor)
            end = channel.end
            stop = min(end, seq + limit)
            events = [channel.event_at(s) for s in range(seq, stop)]
            chunks = [channel.chunk_at(s) for s in range(seq, stop)]
            cursor.seq = stop
            if events:
                self.position = events[-1].id
            return events, chunks
        merged: list[tuple[int, Event, bytes]] = []
        for cursor in self._cursors:
            channel, seq = cursor.channel, cursor.seq
            if seq < channel.start:
                raise Lagged(cursor)
            for s in range(seq, channel.end):
                event = channel.event_at(s)
                merged.append((event.id, event, channel.chunk_at(s)))
        if not merged:
            return [], []
        merged.sort(key=lambda item: item[0])
        del merged[limit:]
        # advance each cursor past what is taken
        taken_through = merged[-1][0]
        for cursor in self._cursors:
            cursor.seq = max(cursor.seq, cursor.channel.seq_after(taken_through))
        self.position = taken_through
        return [m[1] for m in merged], [m[2] for m in merged]

    @staticmethod
    def skip_to_latest(cursor: Cursor) -> None:
        """Move a lagging cursor to the newest entry of its ring (the ``latest`` policy)."""
        cursor.seq = max(cursor.channel.start, cursor.channel.end - 1)
