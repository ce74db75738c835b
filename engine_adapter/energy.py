"""Energy per iteration: measured from NVML on a GPU, modeled elsewhere (and said so).

The model is ``static power x time + energy per byte x bytes + energy per FLOP x FLOPs``.
``lpenv-calibrate`` fits the three to the device's own counter where it has one
(``energy_fit``); the datasheet constants and their sources:

* ``cpu-generic`` (this project's CPU default, a 2-core share of a server socket):
  static 10 W = 2 cores x ~5 W, a server part's TDP over its core count (e.g. 350 W / 60
  cores for a 4th-gen Xeon Platinum, about 5.8 W); 160 pJ/byte for DRAM traffic (Horowitz,
  "Computing's energy problem", ISSCC 2014: 1.3-2.6 nJ per 64-bit DRAM access, i.e. about
  20 pJ/bit); 10 pJ/FLOP for FP32 vector FMAs with their register and cache traffic (the same
  source puts a 32-bit FP multiply-add near 4.6 pJ in 45 nm arithmetic alone; operand
  delivery at least doubles it).
* ``h100-sxm`` (used by the simulator): static 100 W (idle draw of an H100 SXM reported by
  nvidia-smi is 70-120 W), 60 pJ/byte for HBM3 (about 7 pJ/bit, 2023 HBM3 vendor figures),
  0.5 pJ/FLOP for BF16 tensor cores (700 W TDP over ~990 dense TFLOP/s is 0.7 pJ/FLOP at full
  load, static included).
* ``h200``: the H100's compute die (0.5 pJ/FLOP) and idle draw; HBM3e at about 6 pJ/bit
  (50 pJ/byte; vendors quote HBM3e as more efficient per bit than HBM3).
* ``a100-80g``: static 60 W (idle draw of an A100 SXM reported by nvidia-smi is 50-65 W),
  60 pJ/byte for HBM2e, 1.0 pJ/FLOP (400 W TDP over 312 dense BF16 TFLOP/s is 1.3 pJ/FLOP at
  full load, static included).
* Tensor parallel over N devices (``-tpN`` profiles): N times the static power; bytes and FLOPs
  cost the same wherever they run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from mypy_extensions import mypyc_attr

from engine_adapter.compiled import picklable


@dataclass(frozen=True)
class EnergyModel:
    name: str
    static_w: float
    j_per_byte: float
    j_per_flop: float

    def joules(self, seconds: float, num_bytes: int, flops: int) -> float:
        return self.static_w * seconds + self.j_per_byte * num_bytes + self.j_per_flop * flops


ENERGY_MODELS = {
    "cpu-generic": EnergyModel("cpu-generic", static_w=10.0, j_per_byte=160e-12, j_per_flop=10e-12),
    "h100-sxm": EnergyModel("h100-sxm", static_w=100.0, j_per_byte=60e-12, j_per_flop=0.5e-12),
    "h200": EnergyModel("h200", static_w=100.0, j_per_byte=50e-12, j_per_flop=0.5e-12),
    "a100-80g": EnergyModel("a100-80g", static_w=60.0, j_per_byte=60e-12, j_per_flop=1.0e-12),
}


class EnergyMeter(Protocol):
    source: str

    def start(self) -> None: ...

    def stop(self, seconds: float, num_bytes: int, flops: int) -> float: ...


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # (compiled: copied with the env)
class ModeledEnergy:
    """Energy from the documented model; ``source`` says it is modeled and which constants."""

    def __init__(self, model: EnergyModel) -> None:
        self.model = model
        self.source = f"modeled:{model.name}"

    def start(self) -> None:
        pass

    def stop(self, seconds: float, num_bytes: int, flops: int) -> float:
        return self.model.joules(seconds, num_bytes, flops)

    def stop_each(self, seconds: list[float], num_bytes: list[int], flops: list[int]
                  ) -> list[float]:
        """``stop`` of each of a run's iterations (the same sums, one call)."""
        joules = self.model.joules
        return [joules(s, b, f) for s, b, f in zip(seconds, num_bytes, flops)]


class NvmlCounter:
    """NVML's total-energy counter of one GPU (millijoules since the driver loaded), read
    against the host's clock: what the energy meter and the energy fit read."""

    source = "nvml"

    def __init__(self, device_index: int = 0) -> None:
        import pynvml  # from nvidia-ml-py, the `gpu` extra

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        self.read()  # fails here, not mid-run, where the counter is not readable

    def read(self) -> tuple[float, float]:
        """(seconds on the host's clock, joules counted so far)."""
        return (time.perf_counter(),
                self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1e3)

    def power_w(self) -> float:
        """NVML's instantaneous power reading."""
        return self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1e3  # milliwatts


class NvmlEnergy:
    """GPU energy from NVML's total-energy counter (millijoules since driver load).

    The counter advances in steps (about every 20-100 ms, by driver and GPU), so reading it
    around an iteration shorter than a step gives zero or a whole step. Each iteration is
    charged instead the mean power over the latest span in which the counter advanced, times
    its own duration: exact on average over a run, never zero for work done. Before the first
    step, NVML's power reading stands in."""

    source = "measured:nvml"

    def __init__(self, device_index: int = 0) -> None:
        self._counter = NvmlCounter(device_index)
        self._last_t, self._last_j = self._counter.read()
        self._power_w = self._counter.power_w()

    def start(self) -> None:
        pass

    def stop(self, seconds: float, num_bytes: int, flops: int) -> float:
        now, joules = self._counter.read()
        if joules != self._last_j and now > self._last_t:
            self._power_w = (joules - self._last_j) / (now - self._last_t)
            self._last_j, self._last_t = joules, now
        return self._power_w * seconds


def energy_meter(device_type: str, device_index: int = 0) -> EnergyMeter:
    """NVML on a GPU where the counter is readable; the CPU model otherwise; a simulated
    device (``sim:<model>``) names its energy model."""
    if device_type.startswith("sim:"):
        from engine_adapter.hardware import resolve_profile  # the profile holds its energy

        return ModeledEnergy(resolve_profile(device_type[4:]).energy)
    if device_type == "cuda":
        try:
            return NvmlEnergy(device_index)
        except Exception:  # no pynvml or no counter: fall back and say so in the source
            return ModeledEnergy(ENERGY_MODELS["h100-sxm"])
    return ModeledEnergy(ENERGY_MODELS["cpu-generic"])

picklable(EnergyModel)
