"""The observation: a documented, normalized vector built from a SchedulerView alone.

Because it needs nothing but the view (and a few normalization constants), the same encoder
serves the env, the evaluation scripts and the server: an exported policy carries the
constants. Every entry is clipped to [0, ``CLIP``].

| index | entry | normalized by |
|---|---|---|
| 0 | requests waiting | ``max_num_seqs`` |
| 1 | tokens waiting (still to compute) | ``prefill_budget`` |
| 2 | head-of-line wait | TTFT SLO |
| 3 + 2k, 4 + 2k | k-th waiting request: tokens to compute, wait | budget, TTFT SLO |
| then | decode batch size | ``max_num_seqs`` |
| | mean and max decode context length | ``max_model_len`` |
| | KV-cache utilization (used blocks / all blocks) | - |
| | prefill batches in flight | layers |
| | tokens in flight | ``prefill_budget`` |
| | least remaining stages of a batch in flight | layers |
| | recent iteration latency (moving average) | TBT SLO |
| | arrival-rate estimate | ``rate_scale`` |
| | recent energy per token (moving average) | ``energy_scale`` |
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from mypy_extensions import mypyc_attr

from engine_adapter.decision import SchedulerView
from engine_adapter.errors import is_count

SPEC_VERSION = 1
CLIP = 10.0


@mypyc_attr(native_class=False)  # (compiled: made of what users pass, checked here)
@dataclass(frozen=True)
class ObservationSpec:
    ttft_slo_s: float
    tbt_slo_s: float
    prefill_budget: int
    max_num_seqs: int
    max_model_len: int
    num_layers: int
    queue_slots: int = 8
    rate_scale: float = 1.0  # requests per second that maps to 1.0
    energy_scale: float = 0.01  # joules per token that maps to 1.0
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        raw: Any = self  # (untyped until checked)
        if raw.queue_slots != 0 and not is_count(raw.queue_slots):
            raise ValueError(f"queue_slots must be a non-negative integer, got "
                             f"{raw.queue_slots!r}")
        object.__setattr__(self, "queue_slots", int(raw.queue_slots))
        for key in ("rate_scale", "energy_scale"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and value > 0 and np.isfinite(value)):
                raise ValueError(f"{key} must be positive (what maps to 1.0), got {value!r}")

    @property
    def size(self) -> int:
        return 3 + 2 * self.queue_slots + 10

    def names(self) -> list[str]:
        slots = [f"waiting_{k}_{what}" for k in range(self.queue_slots)
                 for what in ("tokens", "wait")]
        return (["queue_len", "queue_tokens", "head_wait"] + slots
                + ["decode_batch", "decode_ctx_mean", "decode_ctx_max", "kv_utilization",
                   "in_flight_batches", "in_flight_tokens", "in_flight_stages_left",
                   "iteration_latency", "arrival_rate", "energy_per_token"])

    def to_json(self) -> dict:
        return asdict(self)

    def encode(self, view: SchedulerView | None) -> np.ndarray:
        if view is None:
            return np.zeros(self.size, dtype=np.float32)
        budget, seqs, ttft = self.prefill_budget, self.max_num_seqs, self.ttft_slo_s
        now, waiting = view.now, view.waiting
        obs = [len(waiting) / seqs, sum(w.num_uncomputed for w in waiting) / budget,
               (now - waiting[0].arrival_time) / ttft if waiting else 0.0]
        for w in waiting[: self.queue_slots]:
            obs += (w.num_uncomputed / budget, (now - w.arrival_time) / ttft)
        obs += (0.0, 0.0) * (self.queue_slots - min(len(waiting), self.queue_slots))
        ctx, in_flight, stats = view.decode_context_lens, view.in_flight, view.stats
        obs += (len(ctx) / seqs,
                (sum(ctx) / len(ctx) / self.max_model_len) if ctx else 0.0,
                (max(ctx) / self.max_model_len) if ctx else 0.0,
                1.0 - view.free_blocks / view.num_blocks,
                len(in_flight) / self.num_layers,
                sum(b.num_tokens for b in in_flight) / budget,
                (min(b.num_groups - b.stage for b in in_flight) / self.num_layers
                 if in_flight else 0.0),
                stats.iteration_latency_s / self.tbt_slo_s,
                stats.arrival_rate / self.rate_scale,
                stats.energy_per_token_j / self.energy_scale)
        out = np.array(obs, dtype=np.float32)
        # (np.clip's Python-level dispatch costs more than the two ufuncs)
        return np.minimum(np.maximum(out, 0.0, out=out), CLIP, out=out)
