"""Energy constants fitted to a counter that steps coarsely, as NVML's does."""

from __future__ import annotations

import math
from bisect import bisect_right

import numpy as np
import pytest

from engine_adapter.calibration import EnergyLoads, energy_spans, fit_energy
from engine_adapter.calibration_record import CalibrationRecord
from engine_adapter.config import EngineConfig
from engine_adapter.cost_model import CostModel
from engine_adapter.energy import EnergyModel
from engine_adapter.energy_fit import EnergySpan, energy_counter, measure_span
from engine_adapter.executor_sim import SimExecutor
from engine_adapter.model_config import ModelConfig
from engine_adapter.plan import IterationPlan, IterationReport

# The device's true constants, none of them a datasheet's (h100-sxm: 100 W, 60 pJ/B, 0.5 pJ/F).
TRUTH = EnergyModel("truth", static_w=83.0, j_per_byte=41e-12, j_per_flop=0.77e-12)


class SteppingCounter:
    """Stands in for a GPU and NVML: wraps the simulator's executor, draws ``TRUTH``'s power
    through each iteration, and shows the energy counted up to the last ``step_s`` boundary
    of its clock (the iterations' sum of latencies), as NVML's counter steps."""

    source = "fake-nvml"

    def __init__(self, inner: SimExecutor, step_s: float) -> None:
        self.inner, self.step_s = inner, step_s
        self.ends, self.energy = [0.0], [0.0]  # iteration ends and the joules up to each

    def execute(self, plan: IterationPlan):
        result = self.inner.execute(plan)
        t = result.traffic
        joules = TRUTH.joules(result.latency_s, t.weight_bytes + t.kv_bytes, t.flops)
        self.ends.append(self.ends[-1] + result.latency_s)
        self.energy.append(self.energy[-1] + joules)
        return result

    def read(self) -> tuple[float, float]:
        now = self.ends[-1]
        edge = math.floor(now / self.step_s) * self.step_s
        i = bisect_right(self.ends, edge) - 1  # power is even through an iteration
        if i + 1 == len(self.ends):
            return now, self.energy[i]
        share = (edge - self.ends[i]) / (self.ends[i + 1] - self.ends[i])
        return now, self.energy[i] + share * (self.energy[i + 1] - self.energy[i])

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def _counter(step_s: float = 0.05) -> tuple[SteppingCounter, ModelConfig, EngineConfig]:
    mc = ModelConfig.load("qwen3-moe-tiny")
    sim = SimExecutor(mc, CostModel(mc, "h100-sxm", 2), noise=False)
    base = EngineConfig(model="qwen3-moe-tiny", prefill_budget=2048, kv_cache_tokens=65536)
    return SteppingCounter(sim, step_s), mc, base


def test_the_fit_finds_the_constants_a_coarse_counter_counted():
    counter, mc, base = _counter()
    loads = EnergyLoads(decode=((1, 128), (8, 128), (32, 128)), prefill=(256, 4096),
                        seconds=1.0)
    spans = energy_spans(base, mc, counter, counter, loads)
    assert [s.load for s in spans] == ["decode 1 x 128", "decode 8 x 128", "decode 32 x 128",
                                       "prefill 256", "prefill 1023"]  # (the model's length)
    for s in spans:
        assert s.seconds >= 1.0 and s.iterations > 50 and s.joules > 0
    # The loads differ in their mix: decode is bytes, prefill is FLOPs.
    per_byte = [s.flops / s.num_bytes for s in spans]
    assert max(per_byte) > 20 * min(per_byte)
    model, errors = fit_energy(spans, "fitted")
    assert model.static_w == pytest.approx(TRUTH.static_w, rel=0.02)
    assert model.j_per_byte == pytest.approx(TRUTH.j_per_byte, rel=0.05)
    assert model.j_per_flop == pytest.approx(TRUTH.j_per_flop, rel=0.05)
    assert np.median(errors) < 0.01


def test_a_span_begins_and_ends_where_the_counter_steps():
    """Only whole steps of the counter are counted: the span's joules are the truth's between
    two step boundaries, and its seconds about a whole number of steps."""
    counter, mc, base = _counter(step_s=0.1)
    spans = energy_spans(base, mc, counter, counter,
                         EnergyLoads(decode=((4, 64),), prefill=(), seconds=0.35))
    (span,) = spans
    steps = span.seconds / 0.1
    assert 4 <= round(steps) <= 6 and abs(steps - round(steps)) < 0.05  # an iteration's slack
    assert span.joules == pytest.approx(TRUTH.joules(span.seconds, span.num_bytes, span.flops),
                                        rel=0.02)


def test_a_counter_that_never_steps_is_an_error_not_a_hang():
    class Stuck:
        source = "stuck"

        def read(self):
            return 0.0, 5.0

    calls = []

    def one() -> IterationReport:
        calls.append(1)
        return IterationReport(iteration=0, mode="layered", start_time=0.0, latency_s=0.01,
                               decode_tokens=1, prefill_tokens=0, stages=[],
                               distinct_experts=[], expert_bytes=0, weight_bytes=1, kv_bytes=0,
                               flops=1, energy_j=0.0, energy_source="x")

    with pytest.raises(RuntimeError, match="did not advance"):
        measure_span(one, Stuck(), 1.0, "decode", max_iterations=100)
    assert len(calls) == 100


def test_the_fit_refuses_what_cannot_tell_the_constants_apart():
    one = EnergySpan("a", 1.0, 10**9, 10**12, 150.0, 10)
    with pytest.raises(ValueError, match="three spans"):
        fit_energy([one, one], "x")
    with pytest.raises(ValueError, match="apart"):
        fit_energy([one, EnergySpan("b", 2.0, 2 * 10**9, 2 * 10**12, 300.0, 20), one], "x")
    with pytest.raises(ValueError, match="time and energy"):
        fit_energy([one, one, EnergySpan("c", 1.0, 1, 1, 0.0, 1)], "x")


def test_the_counter_is_nvml_on_a_gpu_and_none_elsewhere(monkeypatch):
    import sys
    import types

    assert energy_counter("cpu") is None
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: no counter, no error
    assert energy_counter("cuda") is None
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetTotalEnergyConsumption=lambda h: 1_234_567)  # millijoules
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    counter = energy_counter("cuda")
    assert counter.source == "nvml" and counter.read()[1] == pytest.approx(1234.567)


def test_a_record_keeps_its_energy_spans(tmp_path):
    spans = [EnergySpan("decode 1 x 256", 2.01, 123, 456, 170.5, 99)]
    record = CalibrationRecord("m", "cuda", "float32", "here", {}, {}, 0, [],
                               energy_spans=spans, energy_counter="nvml")
    back = CalibrationRecord.read(record.write(tmp_path / "r.json.gz"))
    assert back.energy_spans == spans and back.energy_counter == "nvml"
