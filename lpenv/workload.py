"""Workloads: when requests arrive and how long their prompts and outputs are.

Arrivals are Poisson (exponential gaps) or Gamma (gaps with a chosen coefficient of variation,
burstier when cv > 1). Lengths are drawn from a quantile table shipped with the package
(``lpenv/tables/*.json``, derived from the traces in ``../shared/traces``), scaled by ``scale``
(a CPU runs shorter prompts than the paper's GPUs) and clipped, or read from a trace CSV given
by path (``num_prefill_tokens``, ``num_decode_tokens`` and optionally ``arrival_time_s``).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

LENGTH_TABLES = ("arxiv", "arxiv4k", "sharegpt")


@dataclass(frozen=True)
class RequestSpec:
    request_id: str
    arrival_time: float
    prompt_tokens: int
    output_tokens: int


@dataclass
class WorkloadConfig:
    """``lengths``: a shipped table name; ``trace``: a CSV path (overrides ``lengths``)."""

    name: str = "arxiv4k"
    arrival: str = "poisson"  # poisson | gamma
    rate: float = 1.0  # requests per second
    cv: float = 1.0  # gamma arrivals: coefficient of variation of the gaps
    num_requests: int = 32
    lengths: str = "arxiv4k"
    trace: str | None = None
    scale: float = 1.0  # multiply lengths (e.g. 1/8 for a CPU)
    min_prompt: int = 1
    max_prompt: int = 32768
    min_output: int = 1
    max_output: int = 4096

    def __post_init__(self) -> None:
        if self.arrival not in ("poisson", "gamma"):
            raise ValueError(f"workload.arrival must be poisson or gamma, got {self.arrival!r}")
        if self.rate <= 0 or self.cv <= 0 or self.scale <= 0:
            raise ValueError("workload rate, cv and scale must be positive")
        if self.num_requests <= 0:
            raise ValueError(f"workload.num_requests must be positive, got {self.num_requests}")
        if self.trace is None and self.lengths not in LENGTH_TABLES:
            raise ValueError(f"workload.lengths must be one of {LENGTH_TABLES} or set "
                             f"workload.trace to a CSV path, got {self.lengths!r}")
        if self.trace is not None and not Path(self.trace).is_file():
            raise ValueError(f"workload.trace {self.trace!r} is not a file")
        prompt_ok = 1 <= self.min_prompt <= self.max_prompt
        if not (prompt_ok and 1 <= self.min_output <= self.max_output):
            raise ValueError("workload length bounds must satisfy 1 <= min <= max")


def length_table(name: str) -> dict:
    return json.loads(resources.files("lpenv.tables").joinpath(f"{name}.json").read_text())


def _from_table(table: dict, column: str, u: np.ndarray) -> np.ndarray:
    # Inverse CDF, linear between the table's percentiles.
    return np.interp(u * 100.0, table["percentiles"], table[column])


def _read_trace(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "num_prefill_tokens" not in rows[0] or "num_decode_tokens" not in rows[0]:
        raise ValueError(f"trace {path} needs columns num_prefill_tokens and num_decode_tokens")
    prompts = np.array([float(r["num_prefill_tokens"]) for r in rows])
    outputs = np.array([float(r["num_decode_tokens"]) for r in rows])
    arrivals = None
    if "arrival_time_s" in rows[0]:
        arrivals = np.array([float(r["arrival_time_s"]) for r in rows])
    return prompts, outputs, arrivals


def generate(config: WorkloadConfig, rng: np.random.Generator) -> list[RequestSpec]:
    """The requests of one episode, sorted by arrival time."""
    n = config.num_requests
    arrivals = None
    if config.trace is not None:
        prompts, outputs, trace_arrivals = _read_trace(config.trace)
        idx = rng.integers(0, len(prompts), n) if trace_arrivals is None else np.arange(
            min(n, len(prompts)))
        prompts, outputs = prompts[idx], outputs[idx]
        if trace_arrivals is not None:
            arrivals = trace_arrivals[idx]
        n = len(idx)
    else:
        table = length_table(config.lengths)
        prompts = _from_table(table, "prompt_tokens", rng.random(n))
        outputs = _from_table(table, "output_tokens", rng.random(n))
    if arrivals is None:
        if config.arrival == "poisson":
            gaps = rng.exponential(1.0 / config.rate, n)
        else:
            shape = 1.0 / config.cv**2
            gaps = rng.gamma(shape, 1.0 / (config.rate * shape), n)
        arrivals = np.cumsum(gaps)
    prompts = np.clip(np.rint(prompts * config.scale), config.min_prompt, config.max_prompt)
    outputs = np.clip(np.rint(outputs * config.scale), config.min_output, config.max_output)
    order = np.argsort(arrivals, kind="stable")
    return [RequestSpec(f"r{i}", float(arrivals[j]), int(prompts[j]), int(outputs[j]))
            for i, j in enumerate(order)]
