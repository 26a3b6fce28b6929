"""In-process fan-out: topic → channel. Never awaits a subscriber."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from ._channel import DEFAULT_RING_SIZE, Channel, Subscription
from ._models import Event
from ._wire import encode_event


def encode(event: Event) -> bytes:
    """The wire bytes of a stored event, computed once per publish."""
    return encode_event(event.data, id=event.event_id, event=event.event, retry=event.retry)


class Broker:
    """Keeps a channel for every topic that has subscribers, and the live head id.

    ``head`` is the id of the newest event handed to :meth:`publish_local`: every event
    with a larger id reaches the channels after any subscription registered now.
    """

    __slots__ = ("_channels", "head", "policy_for", "ring_size", "subscriptions")

    def __init__(
        self,
        head: int,
        ring_size: int = DEFAULT_RING_SIZE,
        policy_for: Callable[[str], str] = lambda topic: "disconnect",
    ) -> None:
        self.head = head
        self.ring_size = ring_size
        self.policy_for = policy_for
        self._channels: dict[str, Channel] = {}
        self.subscriptions: set[Subscription] = set()

    @property
    def topic_count(self) -> int:
        return len(self._channels)

    def publish_local(self, events: Iterable[Event]) -> None:
        """Put ``events`` (in id order) into their channels and wake their subscribers."""
        touched: list[Channel] = []
        channels = self._channels
        for event in events:
            self.head = event.id
            channel = channels.get(event.topic)
            if channel is None:
                continue
            channel.append(event, encode(event))
            touched.append(channel)
        for channel in touched:
            channel.wake_all()

    def topics(self) -> list[str]:
        """The topics that have a channel (subscribers) now."""
        return list(self._channels)

    def subscribe(self, sub: Subscription, topics: Sequence[str], after: int | None) -> bool:
        """Attach ``sub`` to ``topics``.

        With ``after`` given and every topic's ring covering it, cursors are placed just
        after ``after`` and True is returned (no log read needed). Otherwise cursors are
        placed at the rings' ends (everything up to :attr:`head` must come from the log)
        and False is returned.
        """
        channels = []
        for topic in topics:
            channel = self._channels.get(topic)
            if channel is None:
                channel = Channel(topic, self.ring_size, self.head, self.policy_for(topic))
                self._channels[topic] = channel
            channels.append(channel)
        covered = after is not None and all(c.floor <= after for c in channels)
        for channel in channels:
            seq = channel.seq_after(after) if covered and after is not None else channel.end
            sub.attach(channel, seq)
            channel.subscribers.add(sub)
        self.subscriptions.add(sub)
        return covered

    def unsubscribe(self, sub: Subscription) -> None:
        """Release ``sub``; a channel without subscribers is dropped. Idempotent."""
        if sub not in self.subscriptions:
            return
        self.subscriptions.discard(sub)
        for channel in sub.channels:
            channel.subscribers.discard(sub)
            if not channel.subscribers and self._channels.get(channel.topic) is channel:
                del self._channels[channel.topic]
