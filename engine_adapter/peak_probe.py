"""The device's compute and memory speed, probed between measured iterations.

A shared machine's speed moves while it is measured. On the 2-core host lpenv-calibrate was
developed on, a small matmul ran 36% faster in a process's first minute than later while a copy
ran 35% slower, and the same grid iteration measured minutes apart strayed 7.6-11.3% (the
calibration's measurement scatter, four runs): more than any cost model can be blamed for.
``PeakProbe`` times a small matmul and a copy right before each measured iteration (about 4 ms
on that host). ``PeakTrace`` smooths the readings (a running median over neighbouring
iterations) into how many times as long as usual the device then took per FLOP (``compute``)
and per byte (``memory``), and ``paced_terms`` scales the cost model's FLOP terms and byte
terms by them: the fit and its errors then compare each iteration with the roofline of the
minute it ran in, and the fitted profile is the device at its median pace. Overheads (per
iteration, layer, call, expert) are left unscaled: scaling them by the matmul's pace as well
fitted no better.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

# A projection of the CPU default model's size (64 rows of 512 into 1536), three times, and a
# 16 MiB copy: long enough to read, short beside an iteration (36-850 ms there).
MATMUL_SHAPE = (64, 512, 1536)
MATMUL_REPEATS = 3
COPY_BYTES = 16 << 20
# Readings in the running median. On the host above, windows of 5 to 41 readings took the
# held-out median from 11.1% to 5.3-5.9%; 15 did best.
WINDOW = 15
# The cost model's terms each pace scales (``cost_model.term_names``: the expert curve's
# knots are per-row expert compute).
COMPUTE_TERMS = ("dense_flop", "expert_flop", "attention_flop")
MEMORY_TERMS = ("weight_byte", "kv_byte")


class Probed(Protocol):
    """A measured iteration with the probe's reading before it: (when, matmul s, copy s)."""

    @property
    def probe(self) -> tuple[float, float, float] | None: ...


class PeakProbe:
    """Times ``MATMUL_SHAPE`` matmuls and a ``COPY_BYTES`` copy on ``device``."""

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        rows, k, n = MATMUL_SHAPE
        gen = torch.Generator().manual_seed(0)
        self.device = device
        self.a = torch.randn(rows, k, generator=gen).to(device, dtype)
        self.b = torch.randn(k, n, generator=gen).to(device, dtype)
        numel = COPY_BYTES // self.a.element_size()
        self.src = torch.ones(numel, dtype=dtype, device=device)
        self.dst = torch.empty_like(self.src)
        self()  # first touch of the buffers

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self) -> tuple[float, float, float]:
        """(now, seconds of the matmuls, seconds of the copy)."""
        self._sync()
        t0 = time.perf_counter()
        for _ in range(MATMUL_REPEATS):
            torch.mm(self.a, self.b)
        self._sync()
        t1 = time.perf_counter()
        self.dst.copy_(self.src)
        self._sync()
        t2 = time.perf_counter()
        return t2, t1 - t0, t2 - t1


def _running_median(x: np.ndarray, window: int) -> np.ndarray:
    half = window // 2
    return np.array([np.median(x[max(0, i - half):i + half + 1]) for i in range(len(x))])


@dataclass(frozen=True)
class PeakTrace:
    """The device's pace over a measurement, from every probe reading in it (in time order):
    per reading, how many times as long as the median reading the matmul (``compute``) and the
    copy (``memory``) took, each a running median of ``WINDOW`` readings."""

    at_s: np.ndarray
    compute: np.ndarray
    memory: np.ndarray

    @classmethod
    def of(cls, samples: Sequence[Probed], window: int = WINDOW) -> PeakTrace | None:
        """The trace of ``samples``' readings (all of a measurement's: the grid and the
        held-out runs, which ran in between); None where none was probed."""
        readings = np.array(sorted(s.probe for s in samples if s.probe is not None))
        if not len(readings):
            return None
        paces = [_running_median(readings[:, col], window) for col in (1, 2)]
        return cls(readings[:, 0], *(p / np.median(readings[:, col])
                                     for p, col in zip(paces, (1, 2))))

    def scales(self, samples: Sequence[Probed]) -> np.ndarray:
        """[len(samples), 2]: (compute, memory) pace at each sample's reading; 1 for a sample
        not probed."""
        out = np.ones((len(samples), 2))
        for i, s in enumerate(samples):
            if s.probe is not None:
                at = s.probe[0]
                out[i] = (np.interp(at, self.at_s, self.compute),
                          np.interp(at, self.at_s, self.memory))
        return out

    def spread(self) -> dict:
        """p10 and p90 of each pace, and how many readings: how far the device moved."""
        return {"readings": int(self.at_s.size),
                **{f"{name}_{q}": float(np.percentile(pace, p)) for name, pace in
                   (("compute", self.compute), ("memory", self.memory))
                   for q, p in (("p10", 10), ("p90", 90))}}


def paced_terms(terms: np.ndarray, scales: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """``terms`` ([samples, len(names)], the cost model's sum form) with each FLOP term times
    its sample's compute pace and each byte term times its memory pace."""
    out = np.array(terms, dtype=float)
    compute = [i for i, n in enumerate(names)
               if n in COMPUTE_TERMS or n.startswith("expert_rows_to_")]
    memory = [i for i, n in enumerate(names) if n in MEMORY_TERMS]
    out[:, compute] *= scales[:, :1]
    out[:, memory] *= scales[:, 1:]
    return out
