"""Measured latencies at another machine's pace (``backend.latency_scale``; the factor from
``engine_adapter.reference_speed``)."""

from __future__ import annotations

import math

from engine_adapter.executor_wrapper import ExecutorWrapper
from engine_adapter.plan import ExecutionResult, IterationPlan


def check_scale(scale: object, name: str = "latency scale") -> float:
    """``scale`` as a float; a ValueError naming ``name`` unless it is a positive number."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (
            0 < scale < math.inf):
        raise ValueError(f"{name} must be a positive number, got {scale!r}")
    return float(scale)


class ScaledLatency(ExecutorWrapper):
    """Wraps an executor and reports each measured latency times ``scale`` (the clock
    advances by that; energy modeled from time follows it)."""

    # (an inner executor's runs would be priced unscaled: one iteration at a time here)
    execute_run = None

    def __init__(self, inner, scale: float) -> None:
        self.scale = check_scale(scale)
        super().__init__(inner)

    def execute(self, plan: IterationPlan) -> ExecutionResult:
        result = self.inner.execute(plan)
        result.latency_s *= self.scale
        return result
