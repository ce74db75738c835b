"""A roofline cost model: an iteration's latency from its plan, without running it.

Each layer costs ``max(compute, memory)`` (their sum where they do not overlap, as on the CPU)
plus a fixed overhead per layer and per distinct expert (kernel launches, or the CPU's Python
expert loop), and each iteration a fixed overhead. Compute prices dense projections, expert
FFNs and attention FLOPs each at its own share of the peak; memory prices weight and KV bytes
each at its own share of the bandwidth (``engine_adapter.hardware``). Per-call overheads on
top of a per-FLOP cost make each operator's effective efficiency a saturating curve in the
rows it runs over (few rows: overhead-bound; many: peak-bound), which is the shape
``lpenv-calibrate`` fits. Distinct experts come from the executor (the real routers) or, for
plans not run, from uniform routing: ``E (1 - (1 - k/E)^rows)``.

Used by the ``modeled`` latency option (deterministic episodes on the real engine), by
policies that estimate what a decision will cost, and by the simulator backend.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine_adapter.hardware import HardwareProfile, resolve_profile
from engine_adapter.model_config import ModelConfig
from engine_adapter.plan import ExecutionResult, IterationPlan, Segment, StageWork
from engine_adapter.scheduler import layer_groups
from engine_adapter.traffic import (
    Traffic,
    edge_traffic,
    layer_row_stats,
    per_layer_traffic,
    total_traffic,
)


def expected_distinct_experts(config: ModelConfig, rows: int) -> float:
    if rows <= 0:
        return 0.0
    e, k = config.num_experts, config.top_k
    return e * (1.0 - (1.0 - k / e) ** rows)


class CostModel:
    def __init__(self, config: ModelConfig, profile: HardwareProfile | str = "cpu-generic",
                 dtype_bytes: int = 4) -> None:
        self.config = config
        self.profile = resolve_profile(profile)
        self.dtype_bytes = dtype_bytes

    def iteration_latency(self, plan: IterationPlan,
                          distinct_experts: Sequence[int | None] | None = None) -> float:
        """Latency of ``plan``; distinct experts per layer from the routers if given."""
        return self.price(plan, distinct_experts)[0]

    def price(self, plan: IterationPlan, distinct_experts: Sequence[int | None] | None = None
              ) -> tuple[float, Traffic]:
        """Latency and traffic of ``plan`` (the engine reports the traffic as it is, so it is
        counted once)."""
        cfg, hw = self.config, self.profile
        edge = edge_traffic(cfg, plan, self.dtype_bytes)
        latency = hw.iteration_overhead_s + self._time(edge)
        stats = layer_row_stats(plan, cfg.sliding_window)
        if distinct_experts is None:
            distinct_experts = [
                round(expected_distinct_experts(cfg, st.rows)) if moe and st.rows else None
                for moe, st in zip(cfg.moe_layers, stats)]
        layers = per_layer_traffic(cfg, stats, distinct_experts, self.dtype_bytes)
        layer_time: dict[tuple, float] = {}  # alike layers share a Traffic object
        for st, t, distinct in zip(stats, layers, distinct_experts):
            if not st.rows:
                continue
            key = (id(t), distinct)
            if key not in layer_time:
                layer_time[key] = (hw.layer_overhead_s + (distinct or 0) * hw.expert_overhead_s
                                   + self._time(t)
                                   + hw.allreduce_time(st.rows, cfg.hidden_size,
                                                       self.dtype_bytes))
            latency += layer_time[key]
        return latency, total_traffic(edge, layers)

    def _time(self, t: Traffic) -> float:
        hw = self.profile
        compute = hw.compute_time(t.dense_flops, t.expert_flops, t.attention_flops)
        memory = hw.memory_time(t.weight_bytes, t.kv_bytes)
        return max(compute, memory) if hw.overlap else compute + memory

    def predict(self, decode_context_lens: Sequence[int],
                stages: Sequence[tuple[int, int, Sequence[tuple[int, int]]]] = ()) -> float:
        """Latency of a hypothetical iteration: decode rows with these context lengths, and
        stages given as (first layer, end layer, [(start position, tokens), ...])."""
        decode = tuple(Segment("", n - 1, 1, (), True) for n in decode_context_lens)
        works = tuple(
            StageWork(i, 0, 1, lo, hi, tuple(Segment("", a, n, (), False) for a, n in segs))
            for i, (lo, hi, segs) in enumerate(stages))
        plan = IterationPlan(0, "layered", self.config.num_layers, decode, works)
        return self.iteration_latency(plan)

    def predict_batch(self, decode_context_lens: Sequence[int], pieces: Sequence[tuple[int, int]],
                      num_groups: int) -> list[float]:
        """Per-iteration latency of the G iterations a new batch of ``pieces`` (start, tokens)
        takes, with this decode batch alongside (its growth ignored)."""
        return [self.predict(decode_context_lens, [(lo, hi, pieces)])
                for lo, hi in layer_groups(self.config.num_layers, num_groups)]


class ModeledLatency:
    """Wraps an executor and reports the cost model's latency instead of the measured one,
    so that episodes on the real engine are reproducible."""

    def __init__(self, inner, cost: CostModel) -> None:
        self.inner = inner
        self.cost = cost
        self.device = getattr(inner, "device", None)

    def execute(self, plan: IterationPlan) -> ExecutionResult:
        result = self.inner.execute(plan)
        result.latency_s, result.traffic = self.cost.price(plan, result.distinct_experts)
        return result

    def __getattr__(self, name: str):
        return getattr(self.inner, name)
