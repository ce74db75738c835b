"""Workloads: arrivals over a window, from a rate or from a trace's own times."""

from __future__ import annotations

import numpy as np
import pytest

from lpenv.workload import WorkloadConfig, generate
from scripts.evaluate import arrival_rate


def test_a_trace_of_lengths_over_a_window_arrives_at_the_rate(tmp_path):
    # (it gave num_requests = 32 over ~16 s, whatever duration_s said)
    path = tmp_path / "lengths.csv"
    path.write_text("num_prefill_tokens,num_decode_tokens\n800,40\n1600,80\n400,20\n")
    w = WorkloadConfig(trace=str(path), rate=2.0, duration_s=60.0, warmup_s=5.0)
    requests = generate(w, np.random.default_rng(0))
    assert w.arrival_source == "poisson"
    assert requests[-1].arrival_time < 65.0
    assert len(requests) == pytest.approx(2.0 * 65.0, rel=0.25)


def test_a_trace_with_arrival_times_brings_its_own(tmp_path):
    path = tmp_path / "timed.csv"
    rows = [(100 + i, 10, 0.5 * i) for i in range(40)]  # 2 req/s over 19.5 s
    path.write_text("num_prefill_tokens,num_decode_tokens,arrival_time_s\n"
                    + "".join(f"{p},{o},{t}\n" for p, o, t in rows))
    w = WorkloadConfig(trace=str(path), rate=9.0, duration_s=10.0, scale=1.0)
    requests = generate(w, np.random.default_rng(0))
    assert w.arrival_source == "trace"
    assert [r.arrival_time for r in requests] == [0.5 * i for i in range(20)]  # those < 10 s
    assert [r.prompt_tokens for r in requests] == [100 + i for i in range(20)]
    assert arrival_rate(w, requests) == pytest.approx(2.0)  # not the 9 req/s configured
    everything = WorkloadConfig(trace=str(path), num_requests=100, scale=1.0)
    assert len(generate(everything, np.random.default_rng(0))) == 40


def test_rate_max_draws_each_episodes_rate_within_its_range():
    """Training across loads: each episode (seed) at its own rate in [rate, rate_max], the
    same seed the same workload; without rate_max every episode runs at rate."""
    config = WorkloadConfig(rate=1.0, rate_max=4.0, num_requests=400)

    def rate(requests) -> float:
        return (len(requests) - 1) / (requests[-1].arrival_time - requests[0].arrival_time)

    rates = [rate(generate(config, np.random.default_rng(seed))) for seed in range(20)]
    assert 0.85 < min(rates) < 1.8 and 3.2 < max(rates) < 4.6
    again = generate(config, np.random.default_rng(7))
    assert again == generate(config, np.random.default_rng(7))
    fixed = [rate(generate(WorkloadConfig(rate=2.0, num_requests=400),
                           np.random.default_rng(seed))) for seed in range(20)]
    assert max(fixed) / min(fixed) < 1.3
    with pytest.raises(ValueError, match="rate_max must be at least workload.rate"):
        WorkloadConfig(rate=3.0, rate_max=2.0)
