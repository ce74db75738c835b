"""The one policy protocol for the environment, the evaluation scripts and the server."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from engine_adapter.config import EngineConfig
from engine_adapter.decision import Decision, SchedulerView
from engine_adapter.model_config import ModelConfig


@runtime_checkable
class Policy(Protocol):
    """Chooses, at each decision point, G and the admitted requests of the next prefill batch.

    ``mode`` is the engine scheduling mode the policy drives (``layered`` or ``chunked``); a
    chunked policy is never asked to decide (the engine admits first come, first served) and
    says its per-iteration token budget in ``chunk_tokens``. A policy that never starts a
    batch while ``n`` are in flight may say so in an optional ``max_in_flight = n``: the
    engine then enforces it and does not ask meanwhile (``EngineConfig.max_batches_in_flight``).
    """

    name: str
    mode: str

    def decide(self, view: SchedulerView) -> Decision: ...

    def __call__(self, view: SchedulerView) -> Decision: ...


def check_setting(policy: str, name: str, value, ok: bool, want: str) -> None:
    """A policy setting outside its range is a ``ValueError`` naming it (a config mistake),
    not a surprise mid-run."""
    if not ok:
        raise ValueError(f"policy {policy}: {name} must be {want}, got {value!r}")


@dataclass(frozen=True)
class PolicyContext:
    """What a policy may know about where it runs, besides the views it is shown."""

    model: ModelConfig
    ttft_slo_s: float
    tbt_slo_s: float
    hardware: str = "cpu-generic"  # cost-model profile for policies that estimate latency
    dtype_bytes: int = 4
    engine: EngineConfig | None = None  # the engine it runs on (budget, max_num_seqs, ...)
