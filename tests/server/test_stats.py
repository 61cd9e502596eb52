"""Per-command statistics: counts, errors and latency percentiles from a log2 histogram."""

from __future__ import annotations

from geventtcp.server.stats import Stats


def test_counts_errors_and_percentiles() -> None:
    stats = Stats()
    for _ in range(90):
        stats.record(1, 0, 0.000_010)  # 10 us
    for _ in range(10):
        stats.record(1, 500, 0.050)  # 50 ms
    data = stats.as_dict()["commands"]["1"]
    assert data["count"] == 100 and data["errors"] == 10
    assert 0.010 <= data["p50_ms"] <= 0.016  # bucket bound just above 10 us
    assert 50 <= data["p99_ms"] <= 66
    assert abs(data["mean_ms"] - (90 * 0.01 + 10 * 50) / 100) < 0.01


def test_empty_and_extreme_durations() -> None:
    stats = Stats()
    stats.record(2, 0, 0.0)
    stats.record(2, 0, 1e9)
    data = stats.as_dict()["commands"]["2"]
    assert data["count"] == 2 and data["p50_ms"] > 0
    assert Stats().as_dict()["commands"] == {}
