"""The one policy protocol for the environment, the evaluation scripts and the server."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from engine_adapter.decision import Decision, SchedulerView


@runtime_checkable
class Policy(Protocol):
    """Chooses, at each decision point, G and the admitted requests of the next prefill batch.

    ``mode`` is the engine scheduling mode the policy drives (``layered`` or ``chunked``).
    """

    name: str
    mode: str

    def decide(self, view: SchedulerView) -> Decision: ...

    def __call__(self, view: SchedulerView) -> Decision: ...
