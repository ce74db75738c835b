"""This machine's speed against a reference profile, and measured latencies at its pace.

The CPU SLOs (``conf/slo/cpu.yaml``) were set on the machine the ``cpu-generic`` profile was
read off. A machine that runs the engine 1.6x as long breaks them for that alone, and one that
runs it twice as fast meets them whatever the policy. ``reference_speed`` measures how many
times as long as the reference this machine takes on a short grid of the engine's iterations
(the calibration's probes: decode batches beside layered and chunked prefill), and
``backend.latency_scale`` (``engine_adapter.scaled_latency``) multiplies each measured latency
by the inverse before the virtual clock takes it: the run as measured here, at the
reference's pace. The factor is one for all shapes: where this machine is relatively slower
at some (the speed's p10-p90 says how much they differ), those stay relatively slower.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from engine_adapter.calibration import CalibrationGrid, Sample, profile_grid, speed_ratios
from engine_adapter.config import EngineConfig
from engine_adapter.cost_model import CostModel
from engine_adapter.hardware import HardwareProfile
from engine_adapter.model_config import ModelConfig

# Decode batches of 1-8 (the CPU workloads' range) beside 128- and 512-token prefills in one
# and four layer groups and in 64-token chunks: 76 iterations of qwen3-moe-cpu, about 15 s
# here.
SPEED_GRID = CalibrationGrid(decode=((1, 64), (4, 256), (8, 256)), prefill=(128, 512),
                             groups=(1, 4), chunks=(64,), repeats=1)


@dataclass(frozen=True)
class ReferenceSpeed:
    """How many times as long as ``reference`` prices them this machine took to run
    ``iterations`` iterations: the median (``speed``) and the spread over them."""

    reference: str
    speed: float
    p10: float
    p90: float
    iterations: int

    @property
    def latency_scale(self) -> float:
        """What measured latencies are multiplied by to run at the reference's pace."""
        return 1.0 / self.speed

    def to_json(self) -> dict:
        return {**asdict(self), "latency_scale": self.latency_scale,
                "override": f"backend.latency_scale={self.latency_scale:.4g}"}


def reference_speed(samples: Sequence[Sample], cost: CostModel) -> ReferenceSpeed:
    """The speed of ``samples`` (measured here) against ``cost``'s profile."""
    if not samples:
        raise ValueError("no iterations to measure the speed on")
    ratios = speed_ratios(cost, samples)
    return ReferenceSpeed(cost.profile.name, float(np.median(ratios)),
                          float(np.percentile(ratios, 10)), float(np.percentile(ratios, 90)),
                          len(ratios))


def measure_reference_speed(executor, config: EngineConfig, model_config: ModelConfig,
                            reference: HardwareProfile, grid: CalibrationGrid = SPEED_GRID,
                            seed: int = 0, on_probe: Callable[[], None] | None = None
                            ) -> ReferenceSpeed:
    """Run ``grid`` on ``executor`` (the real engine) and compare with ``reference``."""
    samples = profile_grid(config, model_config, executor, grid, seed, on_probe)
    return reference_speed(samples, CostModel(model_config, reference,
                                              config.torch_dtype.itemsize))
