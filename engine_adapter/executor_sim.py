"""The simulator executor: prices an IterationPlan with the cost model instead of running it.

Everything else (requests, KV blocks, the one scheduler, decisions, reports) is the engine's
own, so a schedule is the same on both backends for the same decisions. Output tokens are
placeholders (token 0): schedules do not depend on token values. Distinct experts per MoE
layer come from a routing model:

* ``uniform``: every token picks its top-k experts uniformly: E (1 - (1 - k/E)^rows);
* ``zipf:S``: expert popularity follows a Zipf law with exponent S (skewed routers): the
  expected count of experts hit by rows x k independent draws, sum_e 1 - (1 - p_e)^(rows k).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine_adapter.cost_model import CostModel
from engine_adapter.model_config import ModelConfig
from engine_adapter.plan import ExecutionResult, IterationPlan


@dataclass(frozen=True)
class SimDevice:
    """Stands in for a torch device: ``type`` ("sim:<energy model>") picks the energy model."""

    type: str


class RoutingModel:
    def __init__(self, config: ModelConfig, kind: str = "uniform") -> None:
        self.config = config
        self.kind = kind
        e = config.num_experts
        if kind == "uniform":
            self.popularity = None
        elif kind.startswith("zipf:"):
            s = float(kind.split(":", 1)[1])
            weights = 1.0 / np.arange(1, e + 1) ** s
            self.popularity = weights / weights.sum()
        else:
            raise ValueError(f"routing model must be 'uniform' or 'zipf:S', got {kind!r}")
        self._cache: dict[int, int] = {}

    def distinct(self, rows: int) -> int:
        if rows not in self._cache:
            e, k = self.config.num_experts, self.config.top_k
            if self.popularity is None:
                expected = e * (1.0 - (1.0 - k / e) ** rows)
            else:
                expected = float(np.sum(1.0 - (1.0 - self.popularity) ** (rows * k)))
            self._cache[rows] = min(e, max(1, round(expected)))  # rows > 0 hit at least one
        return self._cache[rows]


def layer_rows(plan: IterationPlan) -> list[int]:
    """Token rows passing each layer: the decode batch plus the stages covering it."""
    rows = [len(plan.decode)] * plan.num_layers
    for st in plan.stages:
        for layer in range(st.layer_start, st.layer_end):
            rows[layer] += st.num_tokens
    return rows


class SimExecutor:
    def __init__(self, config: ModelConfig, cost: CostModel, routing: str = "uniform",
                 energy_model: str = "cpu-generic") -> None:
        self.config = config
        self.cost = cost
        self.routing = RoutingModel(config, routing)
        self.device = SimDevice(f"sim:{energy_model}")  # energy is always modeled here

    def reset(self) -> None:
        pass  # no state between iterations: carried activations are not simulated

    def execute(self, plan: IterationPlan) -> ExecutionResult:
        distinct: list[int | None] = []
        rows_by_layer = layer_rows(plan)
        for layer, rows in enumerate(rows_by_layer):
            moe = self.config.moe_layers[layer]
            distinct.append(self.routing.distinct(rows) if moe and rows else None)
        sampled = {s.request_id: 0 for s in plan.decode}
        for st in plan.stages:
            if st.is_last:
                sampled.update((s.request_id, 0) for s in st.segments if s.sample)
        latency, traffic = self.cost.price(plan, distinct)
        return ExecutionResult(latency, sampled, [None] * plan.num_layers, distinct=distinct,
                               traffic=traffic)
