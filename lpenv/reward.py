"""Reward: the episode objective ``attainment - energy_weight x joules per token``, paid out
step by step so that the return equals it exactly.

* Attainment (the paper's definition: TTFT within its SLO and every TBT gap within its SLO).
  The first step pays +1; a request costs -1/N the moment it is known to miss (its TTFT
  deadline passes without a first token, or a gap exceeds the TBT SLO), so the agent hears of
  a miss when it happens rather than when the request ends. N counts the requests arriving
  after the workload's warm-up (``warmup_s``): warm-up requests are served but cost nothing,
  as the summary leaves them out. When the episode is settled (``close``: an evaluation's
  end, the env's termination) every request that has not finished misses, and if fewer than
  N arrived (a horizon cut the arrivals short) N becomes the number that arrived. An env
  episode cut short (truncated) is not settled: its return holds the misses known by then.
* Energy: each iteration pays ``-energy_weight x joules / planned tokens`` (prompt plus output
  tokens of the whole workload); the last step corrects the sum to the tokens really served.

So a settled return is ``attained / N - energy_weight x energy / tokens``, the summary's
``slo_attainment - energy_weight x energy_per_token_j``.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from dataclasses import dataclass

from mypy_extensions import mypyc_attr

from engine_adapter.compiled import picklable
from engine_adapter.plan import IterationReport, RunReport
from lpenv.metrics import MetricsRecorder, RequestRecord, measured


@dataclass(frozen=True)
class RewardConfig:
    energy_weight: float = 5.0  # lambda, per joule per token (CPU runs spend ~0.01 J/token)

    def __post_init__(self) -> None:
        if self.energy_weight < 0:
            raise ValueError(f"reward.energy_weight must be >= 0, got {self.energy_weight}")


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tbt_s: float

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.tbt_s <= 0:
            raise ValueError(f"SLOs must be positive, got TTFT {self.ttft_s}, TBT {self.tbt_s}")


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # (compiled: copied with the env)
class RewardAccountant:
    def __init__(self, config: RewardConfig, slo: SLO, recorder: MetricsRecorder,
                 planned_requests: int, planned_tokens: int) -> None:
        self.config, self.slo, self.recorder = config, slo, recorder
        # Requests the objective counts: those arriving after the warm-up (the recorder's
        # ``measure_from_s``), as the summary's attainment counts them.
        self.planned_requests = planned_requests
        self._unit = 1.0 / planned_requests if planned_requests else 0.0
        self.planned_tokens = max(planned_tokens, 1)
        self.missed: set[str] = set()
        self.total = 0.0
        self._pending = 1.0  # the constant of the objective, paid with the first step
        self._open: dict[str, RequestRecord] = {}  # arrived, not finished, not yet missed
        self._seen = 0

    def _miss(self, request_id: str) -> None:
        if request_id not in self.missed:
            self.missed.add(request_id)
            self._pending -= self._cost(request_id)

    def _cost(self, request_id: str) -> float:
        """What a miss of ``request_id`` costs: 1/N, nothing for a warm-up request."""
        rec = self.recorder.requests[request_id]
        return self._unit if measured(rec.arrival_time, self.recorder.measure_from_s) else 0.0

    def rejected(self, request_id: str) -> None:
        self._miss(request_id)

    def iteration(self, report: IterationReport) -> None:
        self._pending -= self.config.energy_weight * report.energy_j / self.planned_tokens
        for ev in report.events:
            if self._late_token(self.recorder.requests[ev.request_id], ev.index, ev.time):
                self._miss(ev.request_id)
        self.deadlines(report.end_time)

    def _late_token(self, rec: RequestRecord, index: int, time: float) -> bool:
        """Whether ``rec``'s ``index``-th token, at ``time``, is late: the first against the
        TTFT SLO, the others by the gap from the one before."""
        if index == 0:
            return time - rec.arrival_time > self.slo.ttft_s
        return time - rec.token_times[index - 1] > self.slo.tbt_s

    def iteration_run(self, report: RunReport) -> None:
        """A run's iterations, paid exactly as ``iteration`` would pay them one by one. Call
        it before the recorder takes the run: it reads each request's tokens as they were
        when the run began. Every decode row gets a token at every iteration's end, so a late
        gap is late for all of them at once; the others (waiting, or in the batch in flight)
        can run out of time at any iteration's end, and the batch's requests get their tokens
        at its last stage's (``emitted_at``) and, in the iterations after it, at each one's."""
        weight, planned = self.config.energy_weight, self.planned_tokens
        ttft, tbt = self.slo.ttft_s, self.slo.tbt_s
        records = self.recorder.requests
        times = report.times
        self._sync_open()
        in_run = set(report.request_ids)
        # The others, each with what its time runs from (``_late``'s test, as it stands).
        silent = []
        for rid, rec in list(self._open.items()):
            if rid in self.missed or rec.finished or rec.rejected:
                del self._open[rid]  # nothing more to find out
            elif rid not in in_run:
                silent.append((rid, rec.token_times[-1], tbt) if rec.token_times
                              else (rid, rec.arrival_time, ttft))
        emitted = {rid for rid, _ in report.emitted}
        n = len(report.energy_j)
        at = report.emitted_at % n  # the batch's end: then its requests get tokens each time
        ends = times[1:]
        missed = self.missed
        found: dict[str, int] = {}  # the iteration at whose end each is first found late

        def late(rid: str, i: int) -> None:
            if i < found.get(rid, n) and rid not in missed:
                found[rid] = i

        late_gaps = [i for i, gap in enumerate(report.latencies) if gap > tbt and i]
        first_gap = late_gaps[0] if late_gaps else n
        for rid, index in zip(report.request_ids, report.first_token_index):
            late(rid, 0 if self._late_token(records[rid], index, ends[0]) else first_gap)
        if report.emitted:
            after = next((i for i in late_gaps if i > at), n)
            for rid, index in report.emitted:
                late(rid, at if self._late_token(records[rid], index, ends[at]) else after)
        for rid, since, slo in silent:
            # (from ``at`` on, one of the batch's gets a token at each iteration's end: not
            # late at it); ends only grow, so the first late one is found by bisection
            stop = at if rid in emitted else n
            i = bisect_left(range(stop), True, key=lambda i: ends[i] - since > slo)
            if i < stop:
                late(rid, i)
        # Paid in the order one iteration after the other pays: its energy, then its misses.
        pending = self._pending
        misses = sorted((i, rid) for rid, i in found.items())
        misses.append((n, ""))
        m, due = 0, misses[0][0]
        for i, joules in enumerate(report.energy_j):
            pending -= weight * joules / planned
            while i == due:
                missed.add(misses[m][1])
                pending -= self._cost(misses[m][1])  # (as ``_miss``)
                m += 1
                due = misses[m][0]
        self._pending = pending

    def _sync_open(self) -> None:
        records = self.recorder.requests
        if len(records) > self._seen:  # arrivals since the last look (dicts keep order)
            self._open.update(itertools.islice(records.items(), self._seen, None))
            self._seen = len(records)

    def _late(self, rec: RequestRecord, now: float) -> bool:
        """Whether ``rec`` has run out of time by ``now`` (TTFT, or the gap since its last
        token)."""
        if not rec.token_times:
            return now - rec.arrival_time > self.slo.ttft_s
        return now - rec.token_times[-1] > self.slo.tbt_s

    def deadlines(self, now: float) -> None:
        """Misses that are certain already: a TTFT deadline or a TBT gap that has run out."""
        self._sync_open()
        for rid, rec in list(self._open.items()):
            # Only requests still able to attain are checked, not the whole history.
            if rid in self.missed or rec.finished or rec.rejected:
                del self._open[rid]
                continue
            if self._late(rec, now):
                self._miss(rec.request_id)

    def close(self) -> None:
        """End of episode: unfinished requests miss; normalize by what really happened."""
        for rec in self.recorder.requests.values():
            if not rec.finished:
                self._miss(rec.request_id)
        start = self.recorder.measure_from_s
        counted = [r for r in self.recorder.requests.values() if measured(r.arrival_time, start)]
        arrived = len(counted)
        n_missed = sum(r.request_id in self.missed for r in counted)
        # The steps paid 1 - missed / planned; the objective is 1 - missed / arrived
        # (0 when nothing arrived), the summary's attainment.
        target = 1.0 - n_missed / arrived if arrived else 0.0
        self._pending += target - (1.0 - n_missed * self._unit)
        served = max(self.recorder.tokens(), 1)
        energy = self.recorder.energy_j
        self._pending -= self.config.energy_weight * energy * (1 / served - 1 / self.planned_tokens)

    def take(self) -> float:
        """The reward accrued since the last call."""
        r, self._pending = self._pending, 0.0
        self.total += r
        return r

picklable(RewardConfig)
picklable(SLO)
