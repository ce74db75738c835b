"""The simulator executor: prices an IterationPlan with the cost model instead of running it.

Everything else (requests, KV blocks, the one scheduler, decisions, reports) is the engine's
own, so a schedule is the same on both backends for the same decisions. Output tokens are
placeholders (token 0): schedules do not depend on token values. Distinct experts per MoE
layer come from a routing model (``engine_adapter.routing``).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from itertools import accumulate

import numpy as np
from mypy_extensions import mypyc_attr

from engine_adapter.compiled import picklable
from engine_adapter.cost_model import CostModel
from engine_adapter.model_config import ModelConfig
from engine_adapter.plan import ExecutionResult, IterationPlan, IterationRun, RunResult
from engine_adapter.routing import RoutingModel
from engine_adapter.traffic import (
    Traffic,
    edge_traffic_of,
    layer_classes,
    per_layer,
    run_classes,
)


@dataclass(frozen=True)
class SimDevice:
    """Stands in for a torch device: ``type`` ("sim:<energy model>") picks the energy model."""

    type: str


def layer_rows(plan: IterationPlan) -> list[int]:
    """Token rows passing each layer: the decode batch plus the stages covering it."""
    rows = [len(plan.decode)] * plan.num_layers
    for st in plan.stages:
        for layer in range(st.layer_start, st.layer_end):
            rows[layer] += st.num_tokens
    return rows


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # (compiled: copied with the env)
class SimExecutor:
    needs_data = False  # plans need no block tables or token ids here

    def __init__(self, config: ModelConfig, cost: CostModel, routing: str = "uniform",
                 energy_model: str = "cpu-generic", noise: bool = True, seed: int = 0) -> None:
        self.config = config
        self.cost = cost
        self.routing = RoutingModel(config, routing)
        self.device = SimDevice(f"sim:{energy_model}")  # energy is always modeled here
        # A calibrated profile knows how much measured iterations scatter around its
        # prediction; drawing that scatter gives the simulator the real engine's latency tails
        # (a TBT SLO is broken by one slow iteration). Mean-preserving, seeded per episode.
        self.noise_sd = cost.profile.latency_noise_sd if noise else 0.0
        self._rng = np.random.default_rng(seed)

    def reset(self) -> None:
        pass  # no state between iterations: carried activations are not simulated

    def reseed(self, seed: int) -> None:
        """Restart the latency noise's random stream (episodes are reproducible by seed)."""
        self._rng = np.random.default_rng(seed)

    def _price_plan(self, plan: IterationPlan) -> tuple:
        """Latency and traffic of one plan, with its layer classes and their distinct
        experts."""
        classes = layer_classes(plan, self.config)
        hits = [self.routing.distinct(c.stats.rows) if c.moe and c.stats.rows else None
                for c in classes]
        latency, traffic = self.cost.price_groups(
            plan, [(c, d, c.count) for c, d in zip(classes, hits)])
        return latency, traffic, classes, hits

    def _noise(self, size: int | None = None):
        """Latency factors drawn from the noise stream (one, or ``size`` in a row): lognormal,
        mean 1."""
        sd = self.noise_sd
        return np.exp(sd * self._rng.standard_normal(size) - sd * sd / 2)

    def execute(self, plan: IterationPlan) -> ExecutionResult:
        latency, traffic, classes, hits = self._price_plan(plan)
        sampled = {s.request_id: 0 for s in plan.decode}
        for st in plan.stages:
            if st.is_last:
                sampled.update((s.request_id, 0) for s in st.segments if s.sample)
        if self.noise_sd:
            latency *= float(self._noise())
        distinct = per_layer(classes, hits, plan.num_layers, self.config)
        return ExecutionResult(latency, sampled, [None] * plan.num_layers, distinct=distinct,
                               traffic=traffic)

    def _run_edge(self, run: IterationRun, k: int) -> Traffic | None:
        """The embedding and LM-head traffic of each of a run's iterations, where it changes
        (None where it does not): a batch embeds its rows at its first stage and samples at
        its last."""
        if not run.stages or run.chunk:  # (a chunk is its batch's first and last stage)
            return None
        st, n = run.stages[0], len(run.decode)
        sampled, last = sum(s.sample for s in st.segments), st.num_groups - 1
        made: dict[tuple[bool, bool], Traffic] = {}  # (at most three kinds in a run)
        edges = []
        for stage in range(st.stage, st.stage + k):
            kind = (stage == 0, stage == last)
            edge = made.get(kind)
            if edge is None:
                edge = made[kind] = edge_traffic_of(
                    self.config, n + (st.num_tokens if kind[0] else 0),
                    n + (sampled if kind[1] else 0), self.cost.dtype_bytes)
            edges.append(edge)
        return Traffic([e.expert_bytes for e in edges], [e.weight_bytes for e in edges],
                       [e.kv_bytes for e in edges], [e.flops for e in edges],
                       [e.expert_flops for e in edges], [e.attention_flops for e in edges])

    def _price_run(self, run: IterationRun, k: int) -> tuple:
        """Latency and traffic of a run's first ``k`` iterations, none past its batch's last
        stage unless they are all decode-only (lists over them, or one iteration's)."""
        if k == 1:  # (cheaper as the plan alone, and the same)
            return self._price_plan(run.plan())[:2]
        classes = run_classes(run, self.config, k)
        groups = [(c, self.routing.distinct(c.stats.rows) if c.moe and c.stats.rows else None,
                   c.count) for c in classes]
        return self.cost.price_run(run.plan(), groups, k, self._run_edge(run, k))

    @staticmethod
    def _times(start: float, latency, factors, k: int) -> list[float]:
        """The run's start, then each of its first ``k`` iterations' end: a sequential sum,
        the clock's own (``factors``: the latency noise)."""
        if not isinstance(latency, list):  # (one iteration's, e.g. a batch's one stage)
            latency = [latency] * k
        if factors is not None:
            latency = [x * f for x, f in zip(latency, factors[:k].tolist())]
        return list(accumulate(latency, initial=start))

    def execute_run(self, run: IterationRun, start: float, until: float) -> RunResult:
        """Price a run's iterations at once, each exactly as ``execute`` would price it alone
        (the same cost model, iteration by iteration; the same noise draws), and keep those
        that start before ``until`` (the next arrival or the horizon; the first always runs).
        A run past its batch's last stage is priced up to it first, and after it (the batch's
        requests decoding beside the others, a decode-only run of its own) only where the
        batch ends before ``until``."""
        k = run.max_iterations
        if k == 1:  # (as ``execute`` prices it; no lists to set up)
            latency, traffic = self._price_plan(run.plan())[:2]
            if self.noise_sd:
                latency *= float(self._noise())
            return RunResult.of([start, start + latency], [(traffic, 1)], 1)
        noise_state = factors = None
        if self.noise_sd:
            noise_state = self._rng.bit_generator.state
            factors = self._noise(k)
        j = run.join_at
        if run.joined and k > j:
            latency, traffic = self._price_run(run, j)
            times = self._times(start, latency, factors, j)
            parts = [(traffic, j)]
            if times[-1] < until:  # the iteration after the batch's end runs
                after, after_traffic = self._price_run(run.after_batch(), k - j)
                # (the clock's sum goes on from the batch's end: the same as one sum)
                times += self._times(times[-1], after, None if factors is None
                                     else factors[j:], k - j)[1:]
                parts.append((after_traffic, k - j))
        else:
            latency, traffic = self._price_run(run, k)
            times = self._times(start, latency, factors, k)
            parts = [(traffic, k)]
        ran = max(1, bisect_left(times, until, 0, len(times) - 1))
        if noise_state is not None and ran < k:
            # Leave the noise stream where ``ran`` single iterations would have left it.
            self._rng.bit_generator.state = noise_state
            self._rng.standard_normal(ran)
        return RunResult.of(times[:ran + 1], parts, ran)

picklable(SimDevice)
