"""What a running server has done, in Prometheus' text format (``GET /metrics``).

A server runs for days, so nothing here grows with the requests served: counters and
histograms are cumulative since start, and each request's figures are folded in once, when
it finishes, from its ``lpenv.metrics.RequestRecord`` (the one definition of TTFT, the TBT
gaps and SLO attainment), after which the record is dropped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from engine_adapter.plan import IterationReport
from lpenv.metrics import RequestRecord

# Bucket upper bounds (s). TTFT spans queueing behind long prompts; TBT and iterations sit
# around the SLOs of tens to hundreds of milliseconds.
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0)
TBT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0)
E2E_BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0, 120.0)


def _escaped(value: str) -> str:
    """A label value in the text format: backslash, quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Histogram:
    """A Prometheus histogram: counts at or below each bound, their sum and count."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = np.asarray(bounds, dtype=float)
        self.counts = np.zeros(len(bounds) + 1, dtype=np.int64)  # the last: above every bound
        self.sum = 0.0

    def observe(self, values: Sequence[float] | np.ndarray) -> None:
        values = np.asarray(values, dtype=float).ravel()
        if values.size:
            # (``left``: a value equal to a bound belongs to that bound's bucket, le = "<=")
            self.counts += np.bincount(np.searchsorted(self.bounds, values, side="left"),
                                       minlength=self.counts.size)
            self.sum += float(values.sum())

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    def lines(self, name: str, help_text: str) -> list[str]:
        out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        cumulative = np.cumsum(self.counts)
        for bound, n in zip(self.bounds, cumulative):
            out.append(f'{name}_bucket{{le="{bound:g}"}} {n}')
        out += [f'{name}_bucket{{le="+Inf"}} {cumulative[-1]}', f"{name}_sum {self.sum!r}",
                f"{name}_count {cumulative[-1]}"]
        return out


class ServingMetrics:
    """Counters and histograms of a server's requests and iterations (not thread-safe: the
    serving loop holds its lock around every call)."""

    def __init__(self, ttft_slo_s: float, tbt_slo_s: float,
                 info: dict[str, str] | None = None) -> None:
        self.ttft_slo_s, self.tbt_slo_s = ttft_slo_s, tbt_slo_s
        self.info = info or {}  # what is served (model, policy, mode): lpenv_server_info
        self.outcomes: Counter[str] = Counter()  # finished | aborted | rejected
        self.attained = 0  # finished requests that met both SLOs
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.iterations = 0
        self.preemptions = 0
        self.energy_j = 0.0
        self.energy_sources: set[str] = set()
        self.expert_bytes = 0
        self.prefill_batches: Counter[int] = Counter()  # by their number of layer groups G
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tbt = Histogram(TBT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.iteration_latency = Histogram(TBT_BUCKETS)

    def iteration(self, report: IterationReport) -> None:
        self.iterations += 1
        self.generation_tokens += len(report.events)
        self.preemptions += len(report.preempted)
        self.energy_j += report.energy_j
        self.energy_sources.add(report.energy_source)
        self.expert_bytes += report.expert_bytes
        self.iteration_latency.observe([report.latency_s])
        for st in report.stages:
            if st["stage"] == 0:  # a prefill batch starts: count it once, by its G
                self.prefill_batches[st["num_groups"]] += 1

    def finished(self, record: RequestRecord) -> None:
        self.outcomes["finished"] += 1
        self.prompt_tokens += record.prompt_tokens
        gaps = record.tbt_gaps
        self.ttft.observe([record.ttft])
        self.tbt.observe(gaps)
        self.e2e.observe([record.token_times[-1] - record.arrival_time])
        self.attained += record.meets_ttft(self.ttft_slo_s) and record.meets_tbt(
            self.tbt_slo_s, gaps)

    def ended_early(self, outcome: str) -> None:
        """A request aborted (its client left) or rejected (bad input the engine refused)."""
        self.outcomes[outcome] += 1

    def exposition(self, gauges: dict[str, tuple[float, str]]) -> str:
        """The text ``GET /metrics`` returns; ``gauges``: name -> (value, help), the engine's
        state now."""
        labels = ",".join(f'{k}="{_escaped(v)}"' for k, v in self.info.items())
        lines = ["# HELP lpenv_server_info What is served (always 1).",
                 "# TYPE lpenv_server_info gauge", f"lpenv_server_info{{{labels}}} 1",
                 "# HELP lpenv_requests_total Requests that ended, by outcome.",
                 "# TYPE lpenv_requests_total counter"]
        for outcome in ("finished", "aborted", "rejected"):
            lines.append(f'lpenv_requests_total{{outcome="{outcome}"}} {self.outcomes[outcome]}')
        counters = (
            ("lpenv_slo_attained_total", self.attained,
             f"Finished requests that met the TTFT SLO ({self.ttft_slo_s:g} s) and every TBT "
             f"gap's ({self.tbt_slo_s:g} s)."),
            ("lpenv_prompt_tokens_total", self.prompt_tokens, "Prompt tokens of finished "
             "requests."),
            ("lpenv_generation_tokens_total", self.generation_tokens, "Output tokens emitted."),
            ("lpenv_iterations_total", self.iterations, "Engine iterations run."),
            ("lpenv_preemptions_total", self.preemptions, "Requests preempted for KV blocks "
             "(recomputed later)."),
            ("lpenv_energy_joules_total", self.energy_j, "Energy of the iterations ("
             + (", ".join(sorted(self.energy_sources)) or "none yet") + ")."),
            ("lpenv_expert_bytes_total", self.expert_bytes, "Expert weight bytes loaded."),
        )
        for name, value, help_text in counters:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {value}"]
        lines += ["# HELP lpenv_prefill_batches_total Prefill batches started, by their "
                  "number of layer groups G.", "# TYPE lpenv_prefill_batches_total counter"]
        lines += [f'lpenv_prefill_batches_total{{layer_groups="{g}"}} {n}'
                  for g, n in sorted(self.prefill_batches.items())]
        lines += self.ttft.lines("lpenv_ttft_seconds", "Time to first token of finished "
                                 "requests, from their arrival.")
        lines += self.tbt.lines("lpenv_tbt_seconds", "Gaps between consecutive output tokens "
                                "of finished requests.")
        lines += self.e2e.lines("lpenv_e2e_seconds", "Arrival to last token of finished "
                                "requests.")
        lines += self.iteration_latency.lines("lpenv_iteration_seconds", "Latency of each "
                                              "engine iteration.")
        for name, (value, help_text) in gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(lines) + "\n"
