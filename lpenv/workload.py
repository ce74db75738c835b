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
from dataclasses import dataclass, replace
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np

LENGTH_TABLES = ("arxiv", "arxiv4k", "sharegpt")


class RequestSpec(NamedTuple):
    """One request of a workload. (A named tuple: an episode's reset makes hundreds, and a
    frozen dataclass takes five times as long to make.)"""

    request_id: str
    arrival_time: float
    prompt_tokens: int
    output_tokens: int


@dataclass
class WorkloadConfig:
    """``lengths``: a shipped table name; ``trace``: a CSV path (overrides ``lengths``).

    Arrivals: ``num_requests`` of them, or, with ``duration_s``, as many as arrive in
    ``warmup_s + duration_s`` seconds (the paper: 600 s after a 60 s warm-up), at ``rate``
    (Poisson or Gamma), or at a trace's own ``arrival_time_s`` where it has them (``rate`` and
    ``arrival`` then play no part: ``arrival_source``). Requests that arrive in the first
    ``warmup_s`` are served but left out of the request metrics. With ``rate_max``, each
    episode's rate is drawn uniformly from ``[rate, rate_max]`` first (training across loads:
    an agent trained at one rate meets others when it serves); an evaluation sweeps rates
    instead.
    """

    name: str = "arxiv4k"
    arrival: str = "poisson"  # poisson | gamma
    rate: float = 1.0  # requests per second
    rate_max: float | None = None  # each episode's rate uniform in [rate, rate_max]
    cv: float = 1.0  # gamma arrivals: coefficient of variation of the gaps
    num_requests: int = 32
    lengths: str = "arxiv4k"
    trace: str | None = None
    scale: float = 1.0  # multiply lengths (e.g. 1/8 for a CPU)
    min_prompt: int = 1
    max_prompt: int = 32768
    min_output: int = 1
    max_output: int = 4096
    duration_s: float | None = None
    warmup_s: float = 0.0

    def __post_init__(self) -> None:
        if self.arrival not in ("poisson", "gamma"):
            raise ValueError(f"workload.arrival must be poisson or gamma, got {self.arrival!r}")
        if self.rate <= 0 or self.cv <= 0 or self.scale <= 0:
            raise ValueError("workload rate, cv and scale must be positive")
        if self.rate_max is not None and not self.rate_max >= self.rate:
            raise ValueError(f"workload.rate_max must be at least workload.rate ({self.rate}), "
                             f"got {self.rate_max}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"workload.duration_s must be positive, got {self.duration_s}")
        if self.warmup_s < 0:
            raise ValueError(f"workload.warmup_s must be non-negative, got {self.warmup_s}")
        if self.num_requests <= 0:
            raise ValueError(f"workload.num_requests must be positive, got {self.num_requests}")
        if self.trace is None and self.lengths not in LENGTH_TABLES:
            raise ValueError(f"workload.lengths must be one of {LENGTH_TABLES} or set "
                             f"workload.trace to a CSV path, got {self.lengths!r}")
        if self.trace is not None:
            if not Path(self.trace).is_file():
                raise ValueError(f"workload.trace {self.trace!r} is not a file")
            _read_trace(self.trace)  # a bad trace fails here, with the config, not mid-run
        prompt_ok = 1 <= self.min_prompt <= self.max_prompt
        if not (prompt_ok and 1 <= self.min_output <= self.max_output):
            raise ValueError("workload length bounds must satisfy 1 <= min <= max")


    @property
    def arrival_source(self) -> str:
        """What the arrival times come from: ``trace`` (its ``arrival_time_s``), or
        ``arrival`` (poisson, gamma) at ``rate``."""
        if self.trace is not None and _read_trace(self.trace)[2] is not None:
            return "trace"
        return self.arrival


@cache  # (read once: episodes reset often; callers only read it)
def length_table(name: str) -> dict:
    return json.loads(resources.files("lpenv.tables").joinpath(f"{name}.json").read_text())


def _from_table(table: dict, column: str, u: np.ndarray) -> np.ndarray:
    # Inverse CDF, linear between the table's percentiles.
    return np.interp(u * 100.0, table["percentiles"], table[column])


def _read_trace(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(prompt tokens, output tokens, arrival times or None) of a trace CSV, checked: a bad
    row is an error naming its line, never clipped into a length (read once per file
    version: episodes reset often)."""
    p = Path(path)
    return _trace_arrays(str(p), p.stat().st_mtime)


@lru_cache(maxsize=8)
def _trace_arrays(path: str, mtime: float) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = ["num_prefill_tokens", "num_decode_tokens"]
        if not {*columns} <= set(reader.fieldnames or ()):
            raise ValueError(f"trace {path} needs columns num_prefill_tokens and "
                             f"num_decode_tokens (it has {reader.fieldnames or 'none'})")
        if "arrival_time_s" in reader.fieldnames:
            columns.append("arrival_time_s")
        values = []
        for line, row in enumerate(reader, start=2):
            try:
                v = [float(row[c]) for c in columns]
            except (TypeError, ValueError):
                raise ValueError(f"trace {path}, line {line}: {[row.get(c) for c in columns]} "
                                 f"are not all numbers ({', '.join(columns)})") from None
            if not all(np.isfinite(v)) or min(v) < 0:
                raise ValueError(f"trace {path}, line {line}: {dict(zip(columns, v))}: lengths "
                                 "and arrival times must be finite and non-negative")
            values.append(v)
    if not values:
        raise ValueError(f"trace {path} has no requests")
    table = np.array(values)
    table.flags.writeable = False  # shared by every episode that reads it
    return table[:, 0], table[:, 1], table[:, 2] if len(columns) == 3 else None


def _gaps(config: WorkloadConfig, rng: np.random.Generator, n: int) -> np.ndarray:
    if config.arrival == "poisson":
        return rng.exponential(1.0 / config.rate, n)
    shape = 1.0 / config.cv**2
    return rng.gamma(shape, 1.0 / (config.rate * shape), n)


def generate(config: WorkloadConfig, rng: np.random.Generator) -> list[RequestSpec]:
    """The requests of one episode, sorted by arrival time."""
    if config.rate_max is not None:  # (drawn first: the rest as at a fixed rate)
        config = replace(config, rate=float(rng.uniform(config.rate, config.rate_max)),
                         rate_max=None)
    n = config.num_requests
    arrivals = None
    trace = _read_trace(config.trace) if config.trace is not None else None
    span = config.warmup_s + (config.duration_s or 0.0)
    if trace is not None and trace[2] is not None:
        # The trace's own arrivals: those within the span (duration_s), else its first
        # num_requests.
        idx = (np.flatnonzero(trace[2] < span) if config.duration_s is not None
               else np.arange(min(n, len(trace[0]))))
        prompts, outputs, arrivals = (column[idx] for column in trace)
    else:
        if config.duration_s is not None:
            # Draw gaps until the span is covered (in blocks: the count is not known ahead).
            times = np.cumsum(_gaps(config, rng, int(span * config.rate * 1.2) + 16))
            while times[-1] < span:
                more = np.cumsum(_gaps(config, rng, times.size)) + times[-1]
                times = np.concatenate([times, more])
            arrivals = times[times < span]
            n = arrivals.size
        if trace is not None:  # lengths drawn from the trace's rows
            idx = rng.integers(0, len(trace[0]), n)
            prompts, outputs = trace[0][idx], trace[1][idx]
        else:
            table = length_table(config.lengths)
            prompts = _from_table(table, "prompt_tokens", rng.random(n))
            outputs = _from_table(table, "output_tokens", rng.random(n))
    if arrivals is None:
        arrivals = np.cumsum(_gaps(config, rng, n))
    prompts = np.clip(np.rint(prompts * config.scale), config.min_prompt, config.max_prompt)
    outputs = np.clip(np.rint(outputs * config.scale), config.min_output, config.max_output)
    order = np.argsort(arrivals, kind="stable")
    # (as Python's numbers, whole columns at once)
    times = np.asarray(arrivals, dtype=float)[order].tolist()
    prompt_tokens = prompts[order].astype(np.int64).tolist()
    output_tokens = outputs[order].astype(np.int64).tolist()
    return [RequestSpec(f"r{i}", t, p, o)
            for i, (t, p, o) in enumerate(zip(times, prompt_tokens, output_tokens))]
