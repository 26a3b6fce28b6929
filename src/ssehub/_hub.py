"""The Hub: event log + broker; publish, subscribe (replay then live), drain."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from ._broker import Broker
from ._channel import DisconnectReason, Lagged, Subscription
from ._config import DEFAULT_BACKEND, HubConfig
from ._exceptions import (
    BackendError,
    BackendUnavailableError,
    CapacityError,
    ClientLimitError,
    ConfigError,
    HistoryGoneError,
    HubClosedError,
    HubError,
    InvalidEventError,
    InvalidRequestError,
    PayloadTooLargeError,
)
from ._metrics import HubMetrics
from ._models import Event, NewEvent, validate_event_name, validate_retry, validate_topic
from ._stream import StreamSubscription
from .backends import (
    Backplane,
    EventLog,
    Retention,
    SupportsBackplane,
    SupportsHealth,
    SupportsSize,
    open_event_log,
)

if TYPE_CHECKING:
    from fastapi import APIRouter, FastAPI
    from fastapi.sse import ServerSentEvent

logger = logging.getLogger("ssehub.hub")

REPLAY_PAGE_SIZE: Final = 1000
ACK_TIMEOUT: Final = 2.0
"""Shared log: longest a publish waits for its event to come back through the backplane."""
_JSON: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
"""Compact JSON for event data (one encoder: json.dumps with options builds one per call)."""
_EVENT_ID: Final = re.compile(r"[0-9]{1,19}")

HubState = Literal["new", "running", "draining", "closed"]


@dataclass(frozen=True, slots=True)
class HubStatistics:
    """A snapshot of the hub's live counts."""

    subscribers: int
    streams: int
    topics: int
    head_id: int
    published: int
    state: str
    max_streams: int
    log_events: int | None


@dataclass(slots=True)
class ResumePlan:
    """What a new subscription needs before it goes live.

    ``reset`` set: tell the client its resume point cannot be honoured, then go live.
    ``replay_after`` set: replay ``(replay_after, upto]`` from the log first.
    """

    upto: int
    reset: HistoryGoneError | None = None
    replay_after: int | None = None
    fresh: bool = False
    """No resume point was given: the client starts live at ``upto``."""


def parse_event_id(value: str) -> int:
    """Parse a client's resume point, or raise HistoryGoneError("malformed")."""
    if _EVENT_ID.fullmatch(value) is None:
        raise HistoryGoneError("malformed", f"Last-Event-ID {value[:40]!r} is not an event id")
    return int(value)


class Hub:
    """A Server-Sent Events hub: topics, publish, subscribe with replay, drain.

    ``backend`` is a URL (``memory://``, ``sqlite:///path.db``) or a ready EventLog.
    Settings are :class:`HubConfig` fields, given as keywords or as ``config=``.
    """

    def __init__(
        self,
        backend: str | EventLog = DEFAULT_BACKEND,
        *,
        config: HubConfig | None = None,
        retention: Retention | None = None,
        **settings: Any,
    ) -> None:
        if config is not None and settings:
            raise ConfigError("pass either config= or individual settings, not both")
        self.config = config or HubConfig.from_settings(**settings)
        self.backend_url = backend if isinstance(backend, str) else type(backend).__name__
        self._log: EventLog = (
            open_event_log(backend, retention) if isinstance(backend, str) else backend
        )
        self._broker = Broker(0, self.config.ring_size, self.config.policy_for)
        self._state: HubState = "new"
        self._pending: list[tuple[NewEvent, asyncio.Future[Event]]] = []
        self._wakeup: asyncio.Event | None = None
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._streams: set[StreamSubscription] = set()
        self._idle: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._published = 0
        self._per_ip: dict[str, int] = {}
        self._idempotent: OrderedDict[tuple[str, str], tuple[float, asyncio.Future[Event]]] = (
            OrderedDict()
        )
        self._router: APIRouter | None = None
        self._backplane: Backplane | None = None
        self._acks: deque[tuple[int, list[tuple[asyncio.Future[Event], Event]]]] = deque()
        """Shared log: publishes stored but not yet back through the backplane."""
        self._head_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.metrics = HubMetrics(self.statistics, self._live_deliveries)
        """Prometheus metrics of this hub (``/metrics`` renders them)."""

    # -- lifecycle ------------------------------------------------------------------

    @property
    def state(self) -> HubState:
        return self._state

    @property
    def event_log(self) -> EventLog:
        return self._log

    async def start(self) -> None:
        """Open the event log and start the hub's background tasks."""
        if self._state != "new":
            raise HubClosedError(f"the hub cannot start from state {self._state!r}")
        self._loop = asyncio.get_running_loop()
        await self._log.start()
        self._broker.head = self._log.head()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks.append(asyncio.create_task(self._append_loop(), name="ssehub-appender"))
        if isinstance(self._log, SupportsBackplane):
            # A shared log: every event, this node's own included, reaches the rings
            # through the backplane, so all nodes deliver in the same (id) order.
            self._broker.head = await self._log.current_head()
            self._backplane = self._log.backplane()
            feed = self._backplane.run(
                self._broker.head, self._deliver, self._broker.topics, self._lost
            )
            self._tasks.append(asyncio.create_task(feed, name="ssehub-backplane"))
            async with asyncio.timeout(ACK_TIMEOUT * 5):
                await self._backplane.wait_connected()
        if self.config.heartbeat_interval > 0 or self.config.write_timeout > 0:
            self._tasks.append(asyncio.create_task(self._ticker(), name="ssehub-ticker"))
        self._state = "running"
        logger.info("hub started", extra={"backend": self.backend_url, "head": self._broker.head})

    async def aclose(self, grace: float | None = None) -> None:
        """Drain streams (waiting up to ``grace``, default ``config.shutdown_grace``
        seconds), flush pending publishes, close the log. Idempotent."""
        if self._state == "closed":
            return
        if self._state == "new":
            self._state = "closed"
            await self._log.aclose()
            return
        await self.drain(grace=grace)
        self._closing = True
        assert self._wakeup is not None
        self._wakeup.set()
        appender, *others = self._tasks
        for task in others:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._state = "closed"
        await self._log.aclose()

    async def __aenter__(self) -> Hub:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI | None = None) -> AsyncIterator[None]:
        """Use as ``FastAPI(lifespan=hub.lifespan)``: start, then drain and close."""
        await self.start()
        try:
            yield
        finally:
            await self.aclose()

    def begin_drain(self) -> None:
        """Start draining from any thread or a signal handler; returns at once."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._drain_now)

    def _drain_now(self) -> None:
        if self._state == "running":
            self._state = "draining"
            logger.info("hub draining", extra={"subscribers": len(self._broker.subscriptions)})
        for sub in list(self._broker.subscriptions):
            sub.close(DisconnectReason.SHUTDOWN)

    async def drain(self, grace: float | None = None) -> None:
        """Send every open stream ``event: disconnect`` (reason shutdown) and wait up to
        ``grace`` seconds for them to close. New subscriptions are refused from now on."""
        self._drain_now()
        assert self._idle is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.shutdown_grace if grace is None else grace):
                await self._idle.wait()

    async def check_ready(self) -> None:
        """Raise if the hub cannot serve: not running, or the backend does not answer."""
        if self._state != "running":
            raise HubClosedError(f"the hub is {self._state}")
        if isinstance(self._log, SupportsHealth):
            await self._log.check_ready()

    def statistics(self) -> HubStatistics:
        return HubStatistics(
            subscribers=len(self._broker.subscriptions),
            streams=len(self._streams),
            topics=self._broker.topic_count,
            head_id=self._broker.head,
            published=self._published,
            state=self._state,
            max_streams=self.config.max_streams,
            log_events=self._log.event_count() if isinstance(self._log, SupportsSize) else None,
        )

    def _live_deliveries(self) -> tuple[int, int]:
        """Events and bytes written so far by the open streams (for the metrics)."""
        streams = list(self._streams)
        return sum(s.events_sent for s in streams), sum(s.bytes_sent for s in streams)

    def capacity(self) -> dict[str, Any]:
        """The answer of ``GET /health/stream-capacity``: live counts and a transport advice."""
        config = self.config
        streams = len(self._streams)
        utilization = streams / config.max_streams
        accepting = self._state == "running" and streams < config.max_streams
        poll = not accepting or utilization >= config.poll_threshold
        return {
            "subscribers": streams,
            "max_subscribers": config.max_streams,
            "utilization": round(utilization, 4),
            "accepting": accepting,
            "recommended_transport": "poll" if poll else "sse",
            "poll_interval_ms": config.poll_interval_ms,
        }

    @property
    def router(self) -> APIRouter:
        """The hub's HTTP API as a FastAPI router (``app.include_router(hub.router)``)."""
        if self._router is None:
            from ._routes import build_router

            self._router = build_router(self)
        return self._router

    # -- publish --------------------------------------------------------------------

    def prepare(
        self,
        topic: str,
        data: Any = None,
        *,
        event: str | None = None,
        retry: int | None = None,
        raw_data: str | None = None,
    ) -> NewEvent:
        """Validate and encode an event for publishing (raises InvalidRequestError)."""
        validate_topic(topic)
        validate_event_name(event)
        validate_retry(retry)
        if raw_data is not None:
            if data is not None:
                raise InvalidEventError("give either data (JSON) or raw_data (text), not both")
            if not isinstance(raw_data, str):
                raise InvalidEventError("raw_data must be a string")
            text = raw_data
        else:
            try:
                text = _JSON.encode(data)
            except (TypeError, ValueError) as exc:
                raise InvalidEventError(f"data is not JSON-serializable: {exc}") from exc
        if len(text) > self.config.max_body_size:
            raise PayloadTooLargeError(
                f"event data is larger than the limit of {self.config.max_body_size} bytes"
            )
        return NewEvent(topic=topic, data=text, event=event, retry=retry)

    async def publish(
        self,
        topic: str,
        data: Any = None,
        *,
        event: str | None = None,
        retry: int | None = None,
        raw_data: str | None = None,
    ) -> Event:
        """Append an event to ``topic`` and deliver it to every subscriber.

        ``data`` is any JSON value, sent as its compact JSON text; ``raw_data`` is sent
        as-is (several lines become several ``data:`` lines). Returns the stored event
        (with its id) once it is in the log and handed to the live subscribers.
        """
        new = self.prepare(topic, data, event=event, retry=retry, raw_data=raw_data)
        return await self.append(new)

    async def append(self, new: NewEvent, *, idempotency_key: str | None = None) -> Event:
        """Publish an already validated event (see :meth:`prepare`).

        With an ``idempotency_key``, a second publish to the same topic with the same key
        within ``config.idempotency_window`` seconds stores nothing and returns the event
        the first one stored (waiting for it if it is still in flight).
        """
        if self._closing or self._state not in ("running", "draining"):
            raise HubClosedError(f"cannot publish: the hub is {self._state}")
        assert self._loop is not None
        window = self.config.idempotency_window
        if idempotency_key is None or window <= 0:
            return await self._enqueue(new)
        key = (new.topic, idempotency_key)
        now = self._loop.time()
        remembered = self._idempotent
        while remembered:
            oldest, (expires, _) = next(iter(remembered.items()))
            if expires > now:
                break
            del remembered[oldest]
        entry = remembered.get(key)
        if entry is not None:
            return await asyncio.shield(entry[1])
        future = self._enqueue(new)
        remembered[key] = (now + window, future)
        try:
            return await asyncio.shield(future)
        except HubError:
            if key in remembered and remembered[key][1] is future:
                del remembered[key]  # a failed publish may be retried with the same key
            raise

    def _enqueue(self, new: NewEvent) -> asyncio.Future[Event]:
        assert self._loop is not None and self._wakeup is not None
        future: asyncio.Future[Event] = self._loop.create_future()
        self._pending.append((new, future))
        self._wakeup.set()
        return future

    async def _append_loop(self) -> None:
        """Group commit: append whatever is pending in one batch, then fan out in id order."""
        assert self._wakeup is not None
        pending = self._pending
        while True:
            if not pending:
                if self._closing:
                    return
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            batch = pending[: self.config.max_batch]
            del pending[: len(batch)]
            try:
                events = await self._log.append([new for new, _ in batch])
            except Exception as exc:
                error = exc if isinstance(exc, HubError) else BackendError(f"append failed: {exc}")
                if error is not exc:
                    error.__cause__ = exc
                logger.error("append failed", extra={"error": str(error)})
                if isinstance(error, BackendUnavailableError):
                    # What queued up meanwhile would wait for a backend that just failed
                    # to answer: fail it now too, so publishes fail fast, not one by one.
                    batch += pending
                    pending.clear()
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            self._published += len(events)
            self.metrics.published(len(events))
            done = [(future, stored) for (_, future), stored in zip(batch, events, strict=True)]
            if self._backplane is not None:
                # Acknowledge once the backplane brought the batch back to this node's
                # rings (a client may resume here with the id at once), or after
                # ACK_TIMEOUT at the latest: the events are stored either way.
                self._acks.append((events[-1].id, done))
                if self._broker.head >= events[-1].id:  # it came back before we got here
                    self._acknowledge(self._broker.head)
                else:
                    assert self._loop is not None
                    self._loop.call_later(ACK_TIMEOUT, self._acknowledge, events[-1].id)
                continue
            self._deliver(events, events[-1].id)
            for future, stored in done:
                if not future.done():
                    future.set_result(stored)

    def _deliver(self, events: list[Event], through: int) -> None:
        """Hand events (in id order) to the rings and the live streams; every id up to
        ``through`` has now been delivered."""
        broker = self._broker
        if events:
            broker.publish_local(events)
            # One observation per batch: the time until the fan-out wrote its newest
            # event to every stream that was ready (streams catching up observe theirs).
            self.metrics.latency(time.time() - events[-1].time)
        if through > broker.head:
            broker.head = through
        head = broker.head
        if self._acks:
            self._acknowledge(head)
        if self._head_waiters:
            waiting = []
            for target, waiter in self._head_waiters:
                if target <= head or waiter.done():
                    if not waiter.done():
                        waiter.set_result(None)
                else:
                    waiting.append((target, waiter))
            self._head_waiters = waiting

    def _acknowledge(self, through: int) -> None:
        acks = self._acks
        while acks and acks[0][0] <= through:
            for future, stored in acks.popleft()[1]:
                if not future.done():
                    future.set_result(stored)

    def _lost(self, topics: Sequence[str], error: HistoryGoneError) -> None:
        """The backplane missed events the log no longer holds: streams of those topics
        reconnect and resume from the log, where they get an honest reset."""
        logger.error(
            "backplane lost events", extra={"topics": list(topics), "reason": error.reason}
        )
        lost = set(topics)
        for sub in list(self._broker.subscriptions):
            if lost.intersection(sub.topics):
                sub.close(DisconnectReason.RESYNC)

    def must_catch_up(self, last_event_id: str | None) -> bool:
        """Whether a resume point is beyond what this node's rings have (shared log)."""
        return (
            self._backplane is not None
            and bool(last_event_id)
            and last_event_id.isdigit()  # type: ignore[union-attr]
            and len(last_event_id) <= 19  # type: ignore[arg-type]
            and int(last_event_id) > self._broker.head  # type: ignore[arg-type]
        )

    async def catch_up_to(self, last_event_id: str | None, timeout: float = ACK_TIMEOUT) -> None:
        """With a shared log, wait (up to ``timeout``) until this node's rings reach a
        client's resume point, which another node may have handed out a moment ago."""
        if not self.must_catch_up(last_event_id):
            return
        assert last_event_id is not None
        target = int(last_event_id)
        assert self._loop is not None
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._head_waiters.append((target, waiter))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await waiter

    # -- subscribe ------------------------------------------------------------------

    def open_subscription(
        self,
        topics: Sequence[str],
        last_event_id: str | None,
        *,
        peer: str = "",
        ip: str = "",
        stream: bool = False,
    ) -> tuple[Subscription, ResumePlan]:
        """Register a subscription now (live events start buffering) and say how to resume.

        Synchronous on purpose: the cursors and the head id are captured together, so
        replay ``(after, upto]`` from the log plus live events ``> upto`` have no gap and
        no duplicate. A ``stream`` counts against the stream limits (CapacityError,
        ClientLimitError) and gets the maximum lifetime.
        """
        if self._state != "running":
            if stream:
                self.metrics.refused("draining")
            raise HubClosedError(f"the hub is {self._state}; reconnect later")
        topics = list(dict.fromkeys(topics))
        if not topics:
            raise InvalidRequestError("subscribe to at least one topic")
        if len(topics) > self.config.max_topics:
            raise InvalidRequestError(
                f"{len(topics)} topics requested; the limit is {self.config.max_topics}"
            )
        for topic in topics:
            validate_topic(topic)
        config = self.config
        if stream:
            retry_after = config.overload_retry_ms / 1000
            if len(self._streams) >= config.max_streams:
                self.metrics.refused("over_capacity")
                raise CapacityError(
                    f"this hub holds its maximum of {config.max_streams} streams; retry later",
                    retry_after,
                )
            if config.max_streams_per_ip and self._per_ip.get(ip, 0) >= config.max_streams_per_ip:
                self.metrics.refused("over_ip_limit")
                raise ClientLimitError(
                    f"address {ip} already holds {config.max_streams_per_ip} streams (the limit)",
                    retry_after,
                )
        after: int | None = None
        reset: HistoryGoneError | None = None
        head = self._broker.head
        if last_event_id:
            try:
                after = parse_event_id(last_event_id)
                if after > head:
                    raise HistoryGoneError("future", f"event id {after} has not been issued yet")
                if after < self._log.origin():
                    raise HistoryGoneError("unknown", f"event id {after} is not from this log")
            except HistoryGoneError as exc:
                reset, after = exc, None
        sub = (
            StreamSubscription(self, topics, head, peer, ip)
            if stream
            else Subscription(topics, head, peer, ip)
        )
        covered = self._broker.subscribe(sub, topics, after)
        if isinstance(sub, StreamSubscription):
            self._streams.add(sub)
            self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
            assert self._loop is not None
            sub.opened_at = self._loop.time()
            if config.max_lifetime > 0:
                lifetime = config.max_lifetime * random.uniform(0.8, 1.0)
                sub.timer = self._loop.call_later(lifetime, sub.close, DisconnectReason.LIFETIME)
        if reset is not None:
            self.metrics.reset(reset.reason)
        assert self._idle is not None
        self._idle.clear()
        if after is None:
            return sub, ResumePlan(upto=head, reset=reset, fresh=reset is None)
        if covered:
            sub.position = after
            return sub, ResumePlan(upto=head)
        return sub, ResumePlan(upto=head, replay_after=after)

    def release(self, sub: Subscription) -> None:
        """Forget ``sub`` (idempotent). Called by every consumer when it ends."""
        self._broker.unsubscribe(sub)
        if sub in self._streams:
            self._streams.discard(sub)
            self.metrics.delivered(sub.events_sent, sub.bytes_sent)
            left = self._per_ip[sub.ip] - 1
            if left:
                self._per_ip[sub.ip] = left
            else:
                del self._per_ip[sub.ip]
        if sub.timer is not None:
            sub.timer.cancel()
            sub.timer = None
        if not self._broker.subscriptions and self._idle is not None:
            self._idle.set()

    async def read_replay(self, topics: Sequence[str], after: int, upto: int) -> list[Event]:
        """Events of ``topics`` in ``(after, upto]`` from the log, all or nothing.

        At most ``config.max_replay`` events: a client further behind gets
        HistoryGoneError("too_far_behind") and should resync. Reads go in pages of
        ``REPLAY_PAGE_SIZE``, so the work per request is bounded by ``max_replay``.
        """
        try:
            events = await self._read_replay(topics, after, upto)
        except HistoryGoneError as exc:
            self.metrics.reset(exc.reason)
            raise
        self.metrics.replayed(len(events))
        return events

    async def _read_replay(self, topics: Sequence[str], after: int, upto: int) -> list[Event]:
        events: list[Event] = []
        cap = self.config.max_replay
        cursor = after
        while cursor < upto:
            limit = min(REPLAY_PAGE_SIZE, cap + 1 - len(events))
            page = await self._log.read_after(topics, cursor, limit=limit)
            for event in page:
                if event.id > upto:
                    return events
                events.append(event)
            if len(events) > cap:
                raise HistoryGoneError(
                    "too_far_behind",
                    f"more than {cap} events were missed; resync and reconnect without an id",
                )
            if len(page) < limit:
                break
            cursor = page[-1].id
        return events

    async def subscribe(
        self, topics: Sequence[str], *, last_event_id: str | None = None
    ) -> AsyncIterator[ServerSentEvent]:
        """Yield ``fastapi.sse.ServerSentEvent`` objects: replay after ``last_event_id``
        (or an ``event: reset`` when that is impossible), then live events, until the
        consumer stops or the hub drains (a final ``event: disconnect``).

        For apps that write their own endpoint with ``EventSourceResponse``.
        """
        from fastapi.sse import ServerSentEvent

        await self.catch_up_to(last_event_id)
        sub, plan = self.open_subscription(topics, last_event_id)
        try:
            if plan.reset is not None:
                yield ServerSentEvent(
                    event="reset", raw_data=reset_data(plan.reset, plan.upto), id=str(plan.upto)
                )
            elif plan.replay_after is not None:
                try:
                    replay = await self.read_replay(sub.topics, plan.replay_after, plan.upto)
                except HistoryGoneError as exc:
                    yield ServerSentEvent(
                        event="reset", raw_data=reset_data(exc, plan.upto), id=str(plan.upto)
                    )
                else:
                    for stored in replay:
                        yield to_server_sent_event(stored)
            while True:
                if sub.close_reason is not None:
                    reason = sub.close_reason
                    yield ServerSentEvent(
                        event="disconnect",
                        raw_data=json.dumps({"reason": reason.value}, separators=(",", ":")),
                        retry=self.retry_hint(reason),
                    )
                    return
                try:
                    events, _ = sub.take(REPLAY_PAGE_SIZE)
                except Lagged as lagged:
                    data = self.handle_lag(sub, lagged)
                    if data is not None:
                        yield ServerSentEvent(event="reset", raw_data=data)
                    continue
                for stored in events:
                    yield to_server_sent_event(stored)
                if not events:
                    await sub.wait()
        finally:
            self.release(sub)

    def handle_lag(self, sub: Subscription, lagged: Lagged) -> str | None:
        """Apply the lagging topic's slow-client policy to ``sub``.

        ``latest``: move the cursor to the topic's newest event and return the JSON data
        of the ``event: reset`` to send. ``disconnect``: close ``sub`` (reason slow) and
        return None.
        """
        channel = lagged.cursor.channel
        self.metrics.lagged(channel.policy)
        if channel.policy == "latest":
            Subscription.skip_to_latest(lagged.cursor)
            return lagged_data(channel.topic, sub.position)
        sub.close(DisconnectReason.SLOW)
        return None

    def retry_hint(self, reason: DisconnectReason) -> int:
        """The ``retry:`` sent with a final disconnect: jittered on shutdown so that
        clients come back spread over time (20-100 % of ``shutdown_retry_ms``)."""
        if reason is DisconnectReason.SHUTDOWN:
            return int(self.config.shutdown_retry_ms * random.uniform(0.2, 1.0))
        if reason is DisconnectReason.OVERLOADED:
            return int(self.config.overload_retry_ms * random.uniform(0.5, 1.0))
        return self.config.retry_ms

    async def poll(
        self,
        topics: Sequence[str],
        *,
        last_event_id: str | None = None,
        timeout: float = 25.0,
        peer: str = "",
    ) -> tuple[list[Event | ResetNotice], int]:
        """One long-poll: what is pending after ``last_event_id``, at once if anything is,
        else whatever arrives within ``timeout`` seconds.

        Returns ``(items, position)``: events (and possibly one :class:`ResetNotice`,
        first) and the id to poll with next. The same ids, resume and reset rules as the
        stream, so a client may alternate between polling and streaming. At most
        ``config.poll_batch`` events per answer; a backlog comes over several polls.
        """
        limit = self.config.poll_batch
        await self.catch_up_to(last_event_id)
        sub, plan = self.open_subscription(topics, last_event_id, peer=peer)
        try:
            if plan.reset is not None:
                return [ResetNotice(plan.reset, plan.upto)], plan.upto
            if plan.replay_after is not None:
                try:
                    page = await self._log.read_after(sub.topics, plan.replay_after, limit=limit)
                except HistoryGoneError as exc:
                    self.metrics.reset(exc.reason)
                    return [ResetNotice(exc, plan.upto)], plan.upto
                replay = [event for event in page if event.id <= plan.upto]
                if replay:
                    self.metrics.replayed(len(replay))
                    return list(replay), replay[-1].id
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(timeout, self.config.max_poll_timeout)):
                    while not sub.pending() and sub.close_reason is None:
                        await sub.wait()
            try:
                events, _ = sub.take(limit)
            except Lagged:
                # Fell behind while waiting: the next poll resumes from the log.
                return [], sub.position
            return list(events), sub.position
        finally:
            self.release(sub)

    # -- heartbeats -----------------------------------------------------------------

    async def _ticker(self) -> None:
        """One ticker for all streams: heartbeats for idle streams, and the write timeout
        for streams whose send is blocked on a full socket."""
        config = self.config
        half_beat = config.heartbeat_interval / 2
        timeout = config.write_timeout
        period = min(p for p in (half_beat, timeout / 4) if p > 0)
        loop = asyncio.get_running_loop()
        next_beat = loop.time() + half_beat
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            streams = list(self._streams)
            if timeout > 0:
                for sub in streams:
                    if sub.busy and now - sub.busy_since >= timeout:
                        sub.close(DisconnectReason.STALLED)
            if half_beat > 0 and now >= next_beat:
                # A stream that wrote nothing since the previous beat gets a comment, so
                # an idle stream hears from the hub every heartbeat_interval.
                next_beat = now + half_beat
                for sub in streams:
                    if sub.wrote:
                        sub.wrote = False
                    else:
                        sub.heartbeat()


@dataclass(frozen=True, slots=True)
class ResetNotice:
    """A long-poll item saying the resume point could not be honoured (``event: reset``)."""

    error: HistoryGoneError
    current: int

    @property
    def data(self) -> str:
        return reset_data(self.error, self.current)


def reset_data(exc: HistoryGoneError, current: int) -> str:
    """The JSON payload of an ``event: reset``."""
    return json.dumps(
        {"reason": exc.reason, "detail": exc.detail, "current_id": str(current)},
        separators=(",", ":"),
    )


def lagged_data(topic: str, position: int) -> str:
    """The JSON payload of the ``event: reset`` sent when the ``latest`` policy skips."""
    return json.dumps(
        {
            "reason": "lagged",
            "detail": f"fell too far behind on {topic!r}; skipped to its newest event",
            "topic": topic,
            "current_id": str(position),
        },
        separators=(",", ":"),
    )


def to_server_sent_event(event: Event) -> ServerSentEvent:
    from fastapi.sse import ServerSentEvent

    return ServerSentEvent(
        raw_data=event.data, event=event.event, id=event.event_id, retry=event.retry
    )
