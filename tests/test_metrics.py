"""The metrics recorder's summary: what it counts over the measured window."""

from __future__ import annotations

import pytest

from engine_adapter.plan import IterationReport, TokenEvent
from lpenv.metrics import MetricsRecorder


def report(start: float, end: float, events: list[tuple[str, int]]) -> IterationReport:
    return IterationReport(
        iteration=0, mode="layered", start_time=start, latency_s=end - start, decode_tokens=0,
        prefill_tokens=0, stages=[], distinct_experts=[], expert_bytes=0, weight_bytes=0,
        kv_bytes=0, flops=0, energy_j=0.0, energy_source="modeled",
        events=[TokenEvent(rid, i, 0, end) for rid, i in events])


def test_throughput_counts_the_measured_window_only():
    rec = MetricsRecorder(measure_from_s=1.0)
    rec.arrival("warm", 0.0, 10, 3)  # a warm-up request: left out of the request metrics
    rec.arrival("late", 1.2, 10, 2)
    rec.iteration(report(0.0, 0.5, [("warm", 0)]))
    rec.iteration(report(0.5, 1.5, [("warm", 1)]))
    rec.iteration(report(1.5, 2.0, [("warm", 2), ("late", 0)]))
    rec.iteration(report(2.0, 3.0, [("late", 1)]))
    s = rec.summary()
    assert s["requests_total"] == 1 and s["requests_warmup"] == 1
    # Tokens emitted from 1.0 s on (every request's: they share the engine) over 1.0-3.0 s.
    assert s["throughput_tok_s"] == pytest.approx(4 / 2.0)
    assert s["sim_time_s"] == pytest.approx(3.0)


def test_nothing_served_is_no_time_and_no_throughput():
    rec = MetricsRecorder()
    rec.arrival("r", 2.5, 10, 2, rejected=True)
    s = rec.summary()
    assert s["sim_time_s"] == 0.0 and s["requests_rejected"] == 1
    assert s["throughput_tok_s"] != s["throughput_tok_s"]  # NaN: no window
