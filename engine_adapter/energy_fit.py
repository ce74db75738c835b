"""Energy constants fitted to an energy counter (NVML's, on a GPU) by ``lpenv-calibrate``.

The simulator charges an iteration ``static_w x seconds + j_per_byte x bytes + j_per_flop x
FLOPs`` (``engine_adapter.energy``), with datasheet constants. Where the device has an energy
counter, the three are measured instead: the counter, read around sustained loads of different
mixes (decode batches of several sizes, back-to-back prefills), gives each load's joules, and
the engine's own reports give its seconds, bytes and FLOPs.

NVML's counter steps every 20-100 ms, far coarser than an iteration, so no single iteration can
be measured. A span instead runs one load from one step of the counter to another at least
``seconds`` later: what its two ends add or miss of an iteration averages out, and is at most
one iteration's share of the span either way. The fit to the spans is
``calibration.fit_energy``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Protocol

from engine_adapter.energy import NvmlCounter
from engine_adapter.plan import IterationReport


@dataclass(frozen=True)
class EnergySpan:
    """One load, measured between two steps of the counter."""

    load: str
    seconds: float  # on the counter's clock, between the two steps' readings
    num_bytes: int  # weight and KV bytes of the iterations in between
    flops: int
    joules: float
    iterations: int

    def to_json(self) -> dict:
        return asdict(self)


class EnergyCounter(Protocol):
    """A cumulative energy counter and the clock it is read against."""

    source: str

    def read(self) -> tuple[float, float]:
        """(seconds on its clock, joules counted so far)."""
        ...


def measure_span(step: Callable[[], IterationReport], counter: EnergyCounter, seconds: float,
                 load: str, max_iterations: int = 200_000) -> EnergySpan:
    """Run ``step`` (one iteration of a load, its report back) until the counter steps, then
    for at least ``seconds`` more and until it steps again: the joules between those two
    steps, and the seconds, bytes and FLOPs of the iterations run in between."""
    totals = [0, 0, 0]  # bytes, FLOPs and iterations since the span began

    def one() -> None:
        report = step()
        totals[0] += report.total_bytes
        totals[1] += report.flops
        totals[2] += 1

    def until_it_steps(joules: float) -> tuple[float, float]:
        for _ in range(max_iterations):
            one()
            t, now = counter.read()
            if now != joules:
                return t, now
        raise RuntimeError(f"the energy counter ({counter.source}) did not advance in "
                           f"{max_iterations} iterations of load {load!r}")

    t0, j0 = until_it_steps(counter.read()[1])
    totals[:] = [0, 0, 0]
    t, joules = t0, j0
    while t - t0 < seconds:
        if totals[2] >= max_iterations:
            raise RuntimeError(f"load {load!r} ran {max_iterations} iterations in under "
                               f"{seconds} s of the counter's clock")
        one()
        t, joules = counter.read()
    t1, j1 = until_it_steps(joules)
    return EnergySpan(load, t1 - t0, totals[0], totals[1], j1 - j0, totals[2])


def energy_counter(device_type: str, device_index: int = 0) -> EnergyCounter | None:
    """The device's energy counter where one is readable (NVML on a GPU), None elsewhere: no
    CPU counter is read (this machine has no RAPL; energy on a CPU stays modeled)."""
    if device_type != "cuda":
        return None
    try:
        return NvmlCounter(device_index)
    except Exception:  # no nvidia-ml-py, or a GPU without the counter
        return None


def spans_from_json(rows: list) -> list[EnergySpan]:
    return [EnergySpan(**row) for row in rows]
