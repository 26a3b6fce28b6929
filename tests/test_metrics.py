from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import cast

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ssehub import Hub, HubStatistics
from ssehub._metrics import CLOSE_REASONS, LATENCY_BUCKETS, REFUSE_REASONS, HubMetrics

Key = tuple[str, frozenset[tuple[str, str]]]


def samples(metrics: HubMetrics) -> dict[Key, float]:
    """Every sample of a scrape, keyed by (sample name, labels)."""
    text, _ = metrics.render()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


def value(metrics: HubMetrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, frozenset(labels.items())))


def family_names(metrics: HubMetrics) -> set[str]:
    text, _ = metrics.render()
    return {family.name for family in text_string_to_metric_families(text.decode())}


def key(name: str, **labels: str) -> Key:
    return (name, frozenset(labels.items()))


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        pytest.param(
            lambda m: m.stream_opened(),
            {key("ssehub_streams_opened_total"): 1},
            id="stream_opened",
        ),
        pytest.param(
            lambda m: m.stream_closed("stalled"),
            {key("ssehub_streams_closed_total", reason="stalled"): 1},
            id="stream_closed",
        ),
        pytest.param(
            lambda m: m.refused("over_ip_limit"),
            {key("ssehub_streams_refused_total", reason="over_ip_limit"): 1},
            id="refused",
        ),
        pytest.param(
            lambda m: m.published(7),
            {key("ssehub_events_published_total"): 7},
            id="published",
        ),
        pytest.param(
            lambda m: m.delivered(3, 120),
            {key("ssehub_deliveries_total"): 3, key("ssehub_delivered_bytes_total"): 120},
            id="delivered",
        ),
        pytest.param(
            lambda m: m.replayed(42),
            {key("ssehub_replayed_events_total"): 42},
            id="replayed",
        ),
        pytest.param(
            lambda m: m.reset("epoch"),
            {key("ssehub_resets_total", reason="epoch"): 1},
            id="reset",
        ),
        pytest.param(
            lambda m: m.lagged("disconnect"),
            {key("ssehub_lagging_subscribers_total", policy="disconnect"): 1},
            id="lagged-disconnect",
        ),
        pytest.param(
            lambda m: m.lagged("latest"),
            {key("ssehub_lagging_subscribers_total", policy="latest"): 1},
            id="lagged-latest",
        ),
        pytest.param(
            lambda m: m.latency(0.002),
            {
                key("ssehub_publish_to_write_seconds_count"): 1,
                key("ssehub_publish_to_write_seconds_sum"): 0.002,
            },
            id="latency",
        ),
    ],
)
def test_each_method_moves_its_series_and_no_other(
    call: Callable[[HubMetrics], None], expected: dict[Key, float]
) -> None:
    metrics = HubMetrics()
    before = samples(metrics)
    call(metrics)
    after = samples(metrics)
    moved = {
        k: v
        for k, v in after.items()
        if before.get(k) != v and not k[0].endswith(("_created", "_bucket"))
    }
    assert moved == pytest.approx(expected)
    assert moved.keys() == expected.keys()


def test_counters_accumulate() -> None:
    metrics = HubMetrics()
    for _ in range(3):
        metrics.stream_opened()
    metrics.stream_closed("slow")
    metrics.stream_closed("slow")
    metrics.stream_closed("client_gone")
    metrics.published(2)
    metrics.published(5)
    metrics.delivered(1, 10)
    metrics.delivered(4, 30)
    assert value(metrics, "ssehub_streams_opened_total") == 3
    assert value(metrics, "ssehub_streams_closed_total", reason="slow") == 2
    assert value(metrics, "ssehub_streams_closed_total", reason="client_gone") == 1
    assert value(metrics, "ssehub_events_published_total") == 7
    assert value(metrics, "ssehub_deliveries_total") == 5
    assert value(metrics, "ssehub_delivered_bytes_total") == 40


def test_known_label_values_are_exported_at_zero() -> None:
    metrics = HubMetrics()
    for reason in CLOSE_REASONS:
        assert value(metrics, "ssehub_streams_closed_total", reason=reason) == 0
    for reason in REFUSE_REASONS:
        assert value(metrics, "ssehub_streams_refused_total", reason=reason) == 0
    for policy in ("disconnect", "latest"):
        assert value(metrics, "ssehub_lagging_subscribers_total", policy=policy) == 0


def test_unknown_label_value_gets_its_own_series() -> None:
    metrics = HubMetrics()
    metrics.stream_closed("forbidden")
    metrics.stream_closed("forbidden")
    assert value(metrics, "ssehub_streams_closed_total", reason="forbidden") == 2
    assert value(metrics, "ssehub_streams_closed_total", reason="slow") == 0


def test_instances_do_not_share_counts() -> None:
    first, second = HubMetrics(), HubMetrics()
    first.stream_opened()
    first.published(10)
    first.stream_closed("slow")
    first.latency(0.1)
    assert value(first, "ssehub_streams_opened_total") == 1
    assert value(second, "ssehub_streams_opened_total") == 0
    assert value(second, "ssehub_events_published_total") == 0
    assert value(second, "ssehub_streams_closed_total", reason="slow") == 0
    assert value(second, "ssehub_publish_to_write_seconds_count") == 0
    assert first.registry is not second.registry


def test_latency_histogram_buckets() -> None:
    metrics = HubMetrics()
    assert LATENCY_BUCKETS[0] == 0.0005
    assert LATENCY_BUCKETS[-1] == 10.0
    for seconds in (0.0001, 0.0005, 0.0007, 0.003, 0.2, 9.0, 30.0):
        metrics.latency(seconds)

    def bucket(le: str) -> float | None:
        return value(metrics, "ssehub_publish_to_write_seconds_bucket", le=le)

    # Buckets are cumulative and upper-inclusive.
    assert bucket("0.0005") == 2
    assert bucket("0.001") == 3
    assert bucket("0.0025") == 3
    assert bucket("0.005") == 4
    assert bucket("0.1") == 4
    assert bucket("0.25") == 5
    assert bucket("5.0") == 5
    assert bucket("10.0") == 6
    assert bucket("+Inf") == 7
    assert value(metrics, "ssehub_publish_to_write_seconds_count") == 7
    assert value(metrics, "ssehub_publish_to_write_seconds_sum") == pytest.approx(39.2043)


@dataclass(frozen=True)
class FakeStatistics:
    streams: int = 0
    subscribers: int = 0
    topics: int = 0
    head_id: int = 0
    published: int = 0
    state: str = "running"
    max_streams: int | None = 10
    log_events: int | None = 0


def fake(stats: FakeStatistics) -> Callable[[], HubStatistics]:
    return lambda: cast(HubStatistics, stats)


def test_statistics_gauges() -> None:
    stats = FakeStatistics(
        streams=4,
        subscribers=6,
        topics=2,
        head_id=99,
        published=99,
        max_streams=100,
        log_events=50,
    )
    metrics = HubMetrics(fake(stats))
    scraped = samples(metrics)
    assert scraped[key("ssehub_open_streams")] == 4
    assert scraped[key("ssehub_subscribers")] == 6
    assert scraped[key("ssehub_topics")] == 2
    assert scraped[key("ssehub_head_id")] == 99
    assert scraped[key("ssehub_max_streams")] == 100
    assert scraped[key("ssehub_log_events")] == 50
    assert scraped[key("ssehub_draining")] == 0


def test_statistics_are_read_at_every_scrape() -> None:
    current = FakeStatistics(streams=1)
    calls = 0

    def statistics() -> HubStatistics:
        nonlocal calls
        calls += 1
        return cast(HubStatistics, current)

    metrics = HubMetrics(statistics)
    assert calls == 0  # not called at construction (registration uses describe())
    assert samples(metrics)[key("ssehub_open_streams")] == 1
    current = FakeStatistics(streams=5, state="draining")
    scraped = samples(metrics)
    assert scraped[key("ssehub_open_streams")] == 5
    assert scraped[key("ssehub_draining")] == 1
    assert calls == 2


def test_real_hub_statistics() -> None:
    hub = Hub()
    scraped = samples(HubMetrics(hub.statistics))
    stats = hub.statistics()
    assert scraped[key("ssehub_open_streams")] == stats.streams
    assert scraped[key("ssehub_head_id")] == stats.head_id
    assert scraped[key("ssehub_draining")] == 0
    if stats.log_events is not None:
        assert scraped[key("ssehub_log_events")] == stats.log_events


@pytest.mark.parametrize("missing", ["absent", "none"])
def test_optional_fields_missing_are_left_out(missing: str) -> None:
    stats: object
    if missing == "none":
        stats = FakeStatistics(max_streams=None, log_events=None)
    else:
        stats = SimpleNamespace(streams=1, subscribers=1, topics=1, head_id=1, state="new")
    metrics = HubMetrics(lambda: cast(HubStatistics, stats))
    names = family_names(metrics)
    assert "ssehub_log_events" not in names
    assert "ssehub_max_streams" not in names
    assert "ssehub_open_streams" in names


def test_no_statistics_no_gauges() -> None:
    names = family_names(HubMetrics())
    assert not names & {"ssehub_open_streams", "ssehub_subscribers", "ssehub_draining"}
    assert "ssehub_streams_opened" in names


def test_failing_statistics_do_not_break_the_scrape(caplog: pytest.LogCaptureFixture) -> None:
    def statistics() -> HubStatistics:
        raise RuntimeError("hub is gone")

    metrics = HubMetrics(statistics)
    metrics.stream_opened()
    assert value(metrics, "ssehub_streams_opened_total") == 1
    assert "ssehub_open_streams" not in family_names(metrics)
    assert "hub statistics failed" in caplog.text


def test_render_content_type_is_prometheus_text() -> None:
    text, content_type = HubMetrics().render()
    assert isinstance(text, bytes)
    assert content_type.startswith("text/plain;")
    assert "version=" in content_type
    assert "charset=utf-8" in content_type
    assert b"# TYPE ssehub_streams_opened_total counter" in text
    assert b"# TYPE ssehub_publish_to_write_seconds histogram" in text
