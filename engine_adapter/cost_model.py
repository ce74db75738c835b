"""A roofline cost model: an iteration's latency from its plan, without running it.

Each layer costs ``max(FLOPs / peak FLOP/s, bytes / bandwidth)`` (the sum where compute and memory
traffic do not overlap, as measured on the CPU) plus a fixed overhead per layer
and per distinct expert (kernel launches, or the CPU's Python expert loop), and each iteration a
fixed overhead. Distinct experts come from the executor (the real routers) or, for plans not
run, from uniform routing: ``E (1 - (1 - k/E)^rows)``.

Used by the ``modeled`` latency option (deterministic episodes on the real engine), by
policies that estimate what a decision will cost, and as the seed of the simulator backend.
The profiles' constants are rough until calibrated against the real engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    peak_flops: float  # FLOP/s the matmuls reach
    bandwidth: float  # bytes/s from memory
    iteration_overhead_s: float
    layer_overhead_s: float
    expert_overhead_s: float  # per distinct expert per MoE layer invocation
    overlap: bool = True  # compute and memory overlap (roofline max) or not (sum)
    # Tensor parallelism: each of ``tensor_parallel`` devices does 1/tp of a layer's FLOPs and
    # bytes, then two all-reduces per layer (after attention and after the MLP) move the rows'
    # hidden states over the link (ring all-reduce: 2 (tp - 1) / tp of the data each).
    tensor_parallel: int = 1
    link_bandwidth: float = 0.0  # bytes/s per device
    allreduce_latency_s: float = 0.0

    def time(self, flops: float, num_bytes: float) -> float:
        tp = self.tensor_parallel
        compute, memory = flops / (self.peak_flops * tp), num_bytes / (self.bandwidth * tp)
        return max(compute, memory) if self.overlap else compute + memory

    def allreduce_time(self, rows: int, hidden: int, dtype_bytes: int) -> float:
        tp = self.tensor_parallel
        if tp == 1 or rows == 0:
            return 0.0
        moved = 2 * (tp - 1) / tp * rows * hidden * dtype_bytes
        return 2 * (self.allreduce_latency_s + moved / self.link_bandwidth)


PROFILES = {
    # Two cores of a recent Xeon in float32, read off qwen3-moe-cpu runs here: a 2,048-token
    # layer-wide prefill reaches ~170 GFLOP/s; 128-token chunks re-reading all experts add
    # ~15 GB/s worth of time on top (no overlap). Overheads are estimates until calibrated.
    "cpu-generic": HardwareProfile("cpu-generic", 170e9, 15e9, 1e-3, 2e-4, 3e-5,
                                   overlap=False),
    # H100 SXM: 989 TFLOP/s dense BF16 and 3.35 TB/s HBM3 (NVIDIA datasheet), at 60% / 80%.
    "h100-sxm": HardwareProfile("h100-sxm", 0.6 * 989e12, 0.8 * 3.35e12, 2e-4, 1e-5, 2e-6),
    # The paper's machine: 2 x H100 SXM, tensor parallel 2 over NVLink 4 (450 GB/s per
    # direction per GPU, datasheet), ~60% reached by all-reduce, ~10 us per all-reduce.
    "h100-sxm-tp2": HardwareProfile("h100-sxm-tp2", 0.6 * 989e12, 0.8 * 3.35e12, 2e-4, 1e-5,
                                    2e-6, tensor_parallel=2, link_bandwidth=0.6 * 450e9,
                                    allreduce_latency_s=10e-6),
}


def expected_distinct_experts(config: ModelConfig, rows: int) -> float:
    if rows <= 0:
        return 0.0
    e, k = config.num_experts, config.top_k
    return e * (1.0 - (1.0 - k / e) ** rows)


class CostModel:
    def __init__(self, config: ModelConfig, profile: HardwareProfile | str = "cpu-generic",
                 dtype_bytes: int = 4) -> None:
        self.config = config
        self.profile = PROFILES[profile] if isinstance(profile, str) else profile
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
        latency = hw.iteration_overhead_s + hw.time(edge.flops, edge.total_bytes)
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
                                   + hw.time(t.flops, t.total_bytes)
                                   + hw.allreduce_time(st.rows, cfg.hidden_size,
                                                       self.dtype_bytes))
            latency += layer_time[key]
        return latency, total_traffic(edge, layers)

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
