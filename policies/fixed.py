"""Fixed layer-group count: every prefill batch gets the same G."""

from __future__ import annotations

from dataclasses import dataclass

from engine_adapter.decision import Decision, SchedulerView
from engine_adapter.errors import is_count
from policies.protocol import check_setting


@dataclass
class FixedGroups:
    """G fixed; FCFS admission of batches of up to ``budget`` prefill tokens (default, and at
    most: the engine's prefill budget), the last request a piece of its prompt if need be.

    ``staggered`` lets a new batch start while another is in flight.
    """

    groups: int = 1
    budget: int | None = None
    staggered: bool = False
    name: str = "fixed"
    mode: str = "layered"

    def __post_init__(self) -> None:
        # (G above the model's layer count: refused where the model is known, make_policy;
        # a view of another model caps it at one layer a group)
        check_setting(self.name, "groups", self.groups, is_count(self.groups),
                      "a positive integer")
        check_setting(self.name, "budget", self.budget,
                      self.budget is None or is_count(self.budget), "a positive integer or null")

    @property
    def max_in_flight(self) -> int | None:
        """Unstaggered, one batch in flight at a time: the engine need not ask while one is."""
        return None if self.staggered else 1

    def decide(self, view: SchedulerView) -> Decision:
        if view.in_flight and not self.staggered:
            return Decision.wait()
        admit = view.fcfs_admission(self.budget)
        if not admit:
            return Decision.wait()
        return Decision(min(self.groups, view.num_layers), admit, self.budget)

    __call__ = decide
