"""Prometheus metrics for one hub.

Every `HubMetrics` owns its own `CollectorRegistry` (never prometheus-client's global
``REGISTRY``), so several hubs can live in one process, as they do in the tests.

The per-delivery figures (deliveries, bytes, publish-to-write latency) are bumped once
per write on the fan-out's hot path, and the streams opened and closed once per
connection, so they are plain integers and a bucket list, turned into metric families
only at scrape time (prometheus-client's own counters take a lock per ``inc()``). The
rarer counters are prometheus-client counters, each bump a dict lookup plus one
``inc()`` on a label child bound in advance. Live counts (open streams,
subscribers, topics, ...) are not tracked here: a collector asks the hub's
``statistics()`` at scrape time.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Final, final

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ._hub import HubStatistics

logger = logging.getLogger("ssehub.metrics")

CLOSE_REASONS: Final = (
    "client_gone",
    "slow",
    "stalled",
    "lifetime",
    "shutdown",
    "overloaded",
    "error",
    "resync",
)
"""Label values of ``ssehub_streams_closed_total``; each series exists from the start."""

REFUSE_REASONS: Final = ("over_capacity", "over_ip_limit", "draining")
"""Label values of ``ssehub_streams_refused_total``."""

LAG_POLICIES: Final = ("disconnect", "latest")
"""Label values of ``ssehub_lagging_subscribers_total``: dropped, or skipped ahead."""

LATENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Upper bounds (seconds) of ``ssehub_publish_to_write_seconds``: 0.5 ms to 10 s."""

_GAUGES: Final = (
    ("ssehub_open_streams", "Open event streams."),
    ("ssehub_subscribers", "Live subscriptions."),
    ("ssehub_topics", "Topics with a channel."),
    ("ssehub_head_id", "Id of the newest event."),
    ("ssehub_max_streams", "Configured limit of open event streams."),
    ("ssehub_log_events", "Events retained in the event log (absent if unknown)."),
    ("ssehub_draining", "1 while the hub is draining for shutdown, else 0."),
)
"""The scrape-time gauges, in exposition order."""


@final
class _Children(dict[str, Counter]):
    """Label value → bound child, created on first use and then reused."""

    __slots__ = ("_metric",)

    def __init__(self, metric: Counter, known: Iterable[str]) -> None:
        super().__init__()
        self._metric: Counter = metric
        for value in known:
            self[value] = metric.labels(value)  # bound now: the series is exported at zero

    def __missing__(self, value: str) -> Counter:
        child = self[value] = self._metric.labels(value)
        return child


@final
class _StatisticsCollector(Collector):
    """Gauges read from ``statistics()`` when the registry is scraped."""

    def __init__(self, statistics: Callable[[], HubStatistics]) -> None:
        self._statistics = statistics

    def describe(self) -> Iterator[Metric]:
        """Names for the registry's clash check, without calling ``statistics()``."""
        for name, documentation in _GAUGES:
            yield GaugeMetricFamily(name, documentation)

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self._statistics()
        except Exception:
            # A broken snapshot must not take the counters down with it.
            logger.exception("hub statistics failed; live gauges left out of this scrape")
            return
        # Read defensively: these fields may be missing or None for some hubs/backends.
        max_streams: int | None = getattr(stats, "max_streams", None)
        log_events: int | None = getattr(stats, "log_events", None)
        values = {
            "ssehub_open_streams": stats.streams,
            "ssehub_subscribers": stats.subscribers,
            "ssehub_topics": stats.topics,
            "ssehub_head_id": stats.head_id,
            "ssehub_max_streams": max_streams,
            "ssehub_log_events": log_events,
            "ssehub_draining": 1 if stats.state == "draining" else 0,
        }
        for name, documentation in _GAUGES:
            value = values[name]
            if value is not None:
                yield GaugeMetricFamily(name, documentation, value)


@final
class _DeliveryCollector(Collector):
    """The hot-path figures of a :class:`HubMetrics`, as metric families at scrape time."""

    def __init__(self, metrics: HubMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily("ssehub_streams_opened", _OPENED_HELP)
        yield CounterMetricFamily("ssehub_streams_closed", _CLOSED_HELP, labels=["reason"])
        yield CounterMetricFamily("ssehub_deliveries", "Events written to subscribers.")
        yield CounterMetricFamily("ssehub_delivered_bytes", "Bytes of events written.")
        yield HistogramMetricFamily("ssehub_publish_to_write_seconds", _LATENCY_HELP)

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        yield CounterMetricFamily("ssehub_streams_opened", _OPENED_HELP, metrics.opened)
        closed = CounterMetricFamily("ssehub_streams_closed", _CLOSED_HELP, labels=["reason"])
        for reason, count in metrics.closed.items():
            closed.add_metric([reason], count)
        yield closed
        events, nbytes = metrics.deliveries, metrics.delivered_bytes
        if metrics.live_deliveries is not None:
            live_events, live_bytes = metrics.live_deliveries()
            events += live_events
            nbytes += live_bytes
        yield CounterMetricFamily("ssehub_deliveries", "Events written to subscribers.", events)
        yield CounterMetricFamily("ssehub_delivered_bytes", "Bytes written to subscribers.", nbytes)
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip(
            (*map(str, LATENCY_BUCKETS), "+Inf"), metrics.latency_counts, strict=True
        ):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(
            "ssehub_publish_to_write_seconds",
            _LATENCY_HELP,
            buckets=buckets,
            sum_value=metrics.latency_sum,
        )


_OPENED_HELP: Final = "Event streams opened."
_CLOSED_HELP: Final = "Event streams closed, by reason."
_LATENCY_HELP: Final = "Time from publish to the event being written to a subscriber."


@final
class HubMetrics:
    """The hub's Prometheus metrics, in a registry of their own.

    ``statistics``, if given, is called at every scrape for the live gauges
    (``ssehub_open_streams``, ``ssehub_subscribers``, ``ssehub_topics``,
    ``ssehub_head_id``, ``ssehub_max_streams``, ``ssehub_log_events``, ``ssehub_draining``);
    a gauge whose field is missing or ``None`` is left out.
    """

    __slots__ = (
        "_lagged",
        "_published",
        "_refused",
        "_replayed",
        "_resets",
        "delivered_bytes",
        "deliveries",
        "latency_counts",
        "closed",
        "latency_sum",
        "live_deliveries",
        "opened",
        "registry",
    )

    def __init__(
        self,
        statistics: Callable[[], HubStatistics] | None = None,
        live_deliveries: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.opened = 0
        self.closed = dict.fromkeys(CLOSE_REASONS, 0)
        self._refused = _Children(
            Counter(
                "ssehub_streams_refused",
                "Event streams refused before they opened, by reason.",
                ["reason"],
                registry=registry,
            ),
            REFUSE_REASONS,
        )
        self._published = Counter("ssehub_events_published", "Events published.", registry=registry)
        self.deliveries = 0
        self.delivered_bytes = 0
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        """Observations per latency bucket (not cumulative); the last is above 10 s."""
        self.latency_sum = 0.0
        self.live_deliveries = live_deliveries
        """Events and bytes written by open streams, added at scrape time: streams count
        their own writes and hand them over (:meth:`delivered`) when they close."""
        registry.register(_DeliveryCollector(self))
        self._replayed = Counter(
            "ssehub_replayed_events", "Events replayed from the log on resume.", registry=registry
        )
        self._resets = _Children(
            Counter(
                "ssehub_resets",
                "Resume points that could not be honoured, by reason.",
                ["reason"],
                registry=registry,
            ),
            (),
        )
        self._lagged = _Children(
            Counter(
                "ssehub_lagging_subscribers",
                "Subscribers that fell behind the ring, by policy applied "
                "(disconnect: dropped, latest: skipped ahead).",
                ["policy"],
                registry=registry,
            ),
            LAG_POLICIES,
        )
        if statistics is not None:
            registry.register(_StatisticsCollector(statistics))

    def stream_opened(self) -> None:
        self.opened += 1

    def stream_closed(self, reason: str) -> None:
        closed = self.closed
        closed[reason] = closed.get(reason, 0) + 1

    def refused(self, reason: str) -> None:
        self._refused[reason].inc()

    def published(self, count: int) -> None:
        self._published.inc(count)

    def delivered(self, events: int, nbytes: int) -> None:
        self.deliveries += events
        self.delivered_bytes += nbytes

    def replayed(self, count: int) -> None:
        self._replayed.inc(count)

    def reset(self, reason: str) -> None:
        self._resets[reason].inc()

    def lagged(self, policy: str) -> None:
        self._lagged[policy].inc()

    def latency(self, seconds: float) -> None:
        self.latency_counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def render(self) -> tuple[bytes, str]:
        """The registry in Prometheus text format, and its ``Content-Type``."""
        # 0.0.4 is the text format every Prometheus version scrapes
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4
