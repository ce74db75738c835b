"""The one place metrics are computed: from per-request token timestamps.

TTFT = first token time - arrival; TBT gaps = differences between consecutive token times;
a request attains its SLO when TTFT <= the TTFT SLO and every gap <= the TBT SLO (the
layered-prefill paper's definition). Energy per token = energy / (prompt + generated tokens).
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from mypy_extensions import mypyc_attr

from engine_adapter.plan import IterationReport, RunReport


def measured(arrival_time: float, measure_from_s: float) -> bool:
    """Whether a request arriving at ``arrival_time`` counts in the request metrics (and the
    reward's attainment): it arrived at or after the warm-up's end, ``measure_from_s``."""
    return arrival_time >= measure_from_s


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # (compiled: copied with the env)
@dataclass
class RequestRecord:
    request_id: str
    arrival_time: float
    prompt_tokens: int
    max_tokens: int
    token_times: list[float] = field(default_factory=list)
    rejected: bool = False  # refused at arrival (e.g. longer than the model): never served

    @property
    def finished(self) -> bool:
        return len(self.token_times) >= self.max_tokens

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival_time if self.token_times else None

    @property
    def tbt_gaps(self) -> np.ndarray:
        return np.diff(np.asarray(self.token_times, dtype=float))

    def meets_ttft(self, ttft_slo: float) -> bool:
        return self.ttft is not None and self.ttft <= ttft_slo

    def meets_tbt(self, tbt_slo: float, gaps: np.ndarray | None = None) -> bool:
        """Finished with every gap within the SLO (an unfinished request has not shown it);
        ``gaps``: its ``tbt_gaps``, where the caller has them already."""
        gaps = self.tbt_gaps if gaps is None else gaps
        return self.finished and bool(np.all(gaps <= tbt_slo))

    def attains(self, ttft_slo: float, tbt_slo: float) -> bool:
        return self.meets_ttft(ttft_slo) and self.meets_tbt(tbt_slo)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # (compiled: copied with the env)
class MetricsRecorder:
    """Collects arrivals and iteration reports; summarizes them on demand.

    Request metrics count the requests arriving at or after ``measure_from_s`` (the end of a
    warm-up); energy, bytes and iteration latencies are the whole run's."""

    def __init__(self, measure_from_s: float = 0.0) -> None:
        self.measure_from_s = measure_from_s
        self.requests: dict[str, RequestRecord] = {}
        self.iteration_latencies: list[float] = []
        self.energy_j = 0.0
        self.energy_sources: set[str] = set()
        self.expert_bytes = 0
        self.total_bytes = 0
        self.first_time: float | None = None
        self.last_time = 0.0

    def arrival(self, request_id: str, time: float, prompt_tokens: int, max_tokens: int,
                rejected: bool = False) -> None:
        self.requests[request_id] = RequestRecord(request_id, time, prompt_tokens, max_tokens,
                                                  rejected=rejected)
        self.first_time = time if self.first_time is None else min(self.first_time, time)

    def iteration(self, report: IterationReport) -> None:
        self.iteration_latencies.append(report.latency_s)
        self.energy_j += report.energy_j
        self.energy_sources.add(report.energy_source)
        self.expert_bytes += report.expert_bytes
        self.total_bytes += report.total_bytes
        self.last_time = max(self.last_time, report.end_time)
        for ev in report.events:
            rec = self.requests[ev.request_id]
            if ev.index != len(rec.token_times):
                raise ValueError(f"request {ev.request_id}: token {ev.index} out of order")
            rec.token_times.append(ev.time)

    def iteration_run(self, report: RunReport) -> None:
        """A run's iterations, exactly as ``iteration`` would take them one by one."""
        self.iteration_latencies += report.latencies
        energy = self.energy_j
        for joules in report.energy_j:  # in order: the same sum as one by one
            energy += joules
        self.energy_j = energy
        self.energy_sources.add(report.energy_source)
        self.expert_bytes += report.expert_bytes
        self.total_bytes += report.total_bytes
        self.last_time = max(self.last_time, report.end_time)
        ends = report.times[1:]
        tokens = [(rid, index, ends) for rid, index in zip(report.request_ids,
                                                           report.first_token_index)]
        tokens += [(rid, index, ends[report.emitted_at:]) for rid, index in report.emitted]
        for rid, index, at in tokens:
            times = self.requests[rid].token_times
            if index != len(times):
                raise ValueError(f"request {rid}: token {index} out of order")
            times += at

    def extend(self, reports: Iterable[IterationReport]) -> None:
        for r in reports:
            self.iteration(r)

    def tokens(self) -> int:
        """Prompt plus generated tokens of every request served (the energy-per-token base)."""
        return sum(r.prompt_tokens + len(r.token_times) for r in self.requests.values()
                   if not r.rejected)

    def summary(self, ttft_slo: float = float("inf"), tbt_slo: float = float("inf")) -> dict:
        recs = [r for r in self.requests.values()
                if measured(r.arrival_time, self.measure_from_s)]
        done = [r for r in recs if r.finished]
        ttfts = np.array([r.ttft for r in recs if r.ttft is not None], dtype=float)
        gaps, owner = tbt_gaps_of(recs)
        late = np.bincount(owner[gaps > tbt_slo], minlength=len(recs)).tolist()
        tbt_ok = [r.finished and not n_late for r, n_late in zip(recs, late)]
        ttft_ok = [r.meets_ttft(ttft_slo) for r in recs]
        lat = np.asarray(self.iteration_latencies, dtype=float)
        tokens = self.tokens()
        # Throughput over the measured window (from the warm-up's end, or the first arrival):
        # every request's tokens emitted in it, warm-up requests' too (they share the engine).
        start = max(self.first_time or 0.0, self.measure_from_s)
        generated = sum(len(r.token_times) - bisect_left(r.token_times, start)
                        for r in self.requests.values())
        window = self.last_time - start
        # (no iteration ran: nothing was served, no time passed)
        span = self.last_time - (self.first_time or 0.0) if lat.size else 0.0

        def pct(a: np.ndarray, *qs: float) -> list[float]:
            # (all of an array's at once: each call sorts it again)
            return np.percentile(a, qs).tolist() if a.size else [float("nan")] * len(qs)

        ttft_p50, ttft_p90, ttft_p99 = pct(ttfts, 50, 90, 99)
        tbt_p50, tbt_p99 = pct(gaps, 50, 99)
        iteration_p50, iteration_p99 = pct(lat, 50, 99)
        n = max(len(recs), 1)
        return {
            "requests_total": len(recs),
            "requests_warmup": len(self.requests) - len(recs),
            "requests_finished": len(done),
            "requests_rejected": sum(r.rejected for r in recs),
            "slo_attainment": sum(a and b for a, b in zip(ttft_ok, tbt_ok)) / n,  # attains
            "ttft_attainment": sum(ttft_ok) / n,
            "tbt_attainment": sum(tbt_ok) / n,
            "ttft_mean_s": float(ttfts.mean()) if ttfts.size else float("nan"),
            "ttft_p50_s": ttft_p50, "ttft_p90_s": ttft_p90, "ttft_p99_s": ttft_p99,
            "tbt_p50_s": tbt_p50, "tbt_p99_s": tbt_p99,
            "e2e_mean_s": float(np.mean([r.token_times[-1] - r.arrival_time for r in done]))
            if done else float("nan"),
            "iteration_p50_s": iteration_p50, "iteration_p99_s": iteration_p99,
            "iterations": int(lat.size),
            "throughput_tok_s": generated / window if window > 0 else float("nan"),
            "energy_j": self.energy_j,
            "energy_per_token_j": self.energy_j / tokens if tokens else float("nan"),
            "energy_source": ",".join(sorted(self.energy_sources)),
            "expert_bytes": self.expert_bytes,
            "total_bytes": self.total_bytes,
            "sim_time_s": span,
        }


def tbt_gaps_of(recs: Sequence[RequestRecord]) -> tuple[np.ndarray, np.ndarray]:
    """Every TBT gap of ``recs``, request after request (their ``tbt_gaps`` concatenated), and
    the index in ``recs`` of the request each gap belongs to. At once: per request, the
    arrays' overhead is most of the work."""
    counts = np.fromiter((len(r.token_times) for r in recs), np.int64, len(recs))
    times = np.fromiter(itertools.chain.from_iterable(r.token_times for r in recs), float,
                        int(counts.sum()))
    gaps = np.diff(times)
    keep = np.ones(gaps.size, bool)
    firsts = (np.cumsum(counts) - counts)[counts > 0][1:]  # each request's first token...
    keep[firsts - 1] = False  # ...is no gap after the request before it
    return gaps[keep], np.repeat(np.arange(len(recs)), np.maximum(counts - 1, 0))


def goodput(attainment_by_rate: dict[float, float], target: float = 0.9) -> float | None:
    """DistServe's goodput: the highest request rate that is served at SLO attainment of at
    least ``target``, and every lower rate tested with it (None if the lowest is not). A
    curve that dips and recovers (one seed: noise) does not lift it past the dip."""
    best = None
    for rate in sorted(attainment_by_rate):
        if not attainment_by_rate[rate] >= target:  # (a NaN attainment is not served)
            break
        best = rate
    return best
