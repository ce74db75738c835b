"""Routing models: how many distinct experts a MoE layer loads for a given number of rows.

The simulator and the cost model have no routers, so they take distinct experts from one of:

* ``uniform``: every token picks its top-k experts uniformly: E (1 - (1 - k/E)^rows);
* ``zipf:S``: expert popularity follows a Zipf law with exponent S (skewed routers): the
  expected count of experts hit by rows x k independent draws, sum_e 1 - (1 - p_e)^(rows k);
* ``empirical:PATH``: a table recorded from the real engine's routers (``lpenv-calibrate``
  writes one), mean distinct experts against rows per MoE layer, interpolated in log(rows).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from mypy_extensions import mypyc_attr

from engine_adapter.errors import ConfigError
from engine_adapter.model_config import ModelConfig


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # (compiled: copied with the env)
class RoutingModel:
    def __init__(self, config: ModelConfig, kind: str = "uniform") -> None:
        self.config = config
        self.kind = kind
        e = config.num_experts
        self.popularity: np.ndarray | None = None
        self.table: tuple[np.ndarray, np.ndarray] | None = None
        if kind == "uniform":
            pass
        elif kind.startswith("zipf:"):
            try:
                s = float(kind.split(":", 1)[1])
            except ValueError:
                s = float("nan")
            if not s >= 0:  # (NaN too)
                raise ConfigError(f"routing {kind!r}: zipf:S takes an exponent S >= 0 (0 is "
                                  "uniform; 1.0 a common skew)")
            weights = 1.0 / np.arange(1, e + 1) ** s
            self.popularity = weights / weights.sum()
        elif kind.startswith("empirical:"):
            self.table = load_routing_table(config, Path(kind.split(":", 1)[1]))
        else:
            raise ConfigError(
                f"routing model must be 'uniform', 'zipf:S' or 'empirical:PATH', got {kind!r}")
        self._cache: dict[int, int] = {}

    def expected(self, rows: int) -> float:
        e, k = self.config.num_experts, self.config.top_k
        uniform = e * (1.0 - (1.0 - k / e) ** rows)
        if self.table is not None:
            log_rows, distinct = self.table
            if np.log(rows) <= log_rows[-1]:
                return float(np.interp(np.log(rows), log_rows, distinct))
            # Past the recorded rows, follow the uniform curve's growth from the last point.
            last = float(np.exp(log_rows[-1]))
            return min(e, distinct[-1] * uniform / (e * (1.0 - (1.0 - k / e) ** last)))
        if self.popularity is None:
            return uniform
        return float(np.sum(1.0 - (1.0 - self.popularity) ** (rows * k)))

    def distinct(self, rows: int) -> int:
        if rows not in self._cache:
            e, k = self.config.num_experts, self.config.top_k
            # rows > 0 hit at least k experts (each token picks k distinct ones)
            self._cache[rows] = min(e, max(min(k, e), round(self.expected(rows))))
        return self._cache[rows]


def record_routing(observations: Iterable[tuple[int, int]], config: ModelConfig,
                   bins_per_decade: int = 8) -> dict:
    """A routing table from (rows, distinct experts) pairs seen at MoE layer invocations:
    the mean distinct count in log-spaced bins of rows."""
    pairs = np.array([(r, d) for r, d in observations if r > 0], dtype=float)
    if pairs.size == 0:
        raise ValueError("no MoE layer invocations were recorded")
    log_rows = np.log10(pairs[:, 0])
    bins = np.floor(log_rows * bins_per_decade).astype(int)
    rows_out, distinct_out, counts = [], [], []
    for b in np.unique(bins):
        sel = bins == b
        rows_out.append(float(np.exp(np.mean(np.log(pairs[sel, 0])))))  # geometric centre
        distinct_out.append(float(pairs[sel, 1].mean()))
        counts.append(int(sel.sum()))
    return {"model": config.name, "num_experts": config.num_experts, "top_k": config.top_k,
            "rows": rows_out, "distinct": distinct_out, "observations": counts}


def load_routing_table(config: ModelConfig, path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise ConfigError(f"routing table {path} does not exist (lpenv-calibrate writes one)")
    data = json.loads(path.read_text())
    if (data.get("num_experts"), data.get("top_k")) != (config.num_experts, config.top_k):
        raise ConfigError(
            f"routing table {path} was recorded for {data.get('num_experts')} experts top-"
            f"{data.get('top_k')}, the model has {config.num_experts} top-{config.top_k}")
    rows = np.asarray(data["rows"], dtype=float)
    distinct = np.asarray(data["distinct"], dtype=float)
    if rows[0] > 1:  # one row hits exactly top-k experts: anchor the curve there
        rows, distinct = np.r_[1.0, rows], np.r_[float(config.top_k), distinct]
    return np.log(rows), np.maximum.accumulate(distinct)  # more rows never hit fewer
