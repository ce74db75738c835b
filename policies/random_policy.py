"""A random policy: uniformly random G and admission level; starts with probability
``start_prob`` (it never waits forever: it starts whenever nothing else runs)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine_adapter.decision import Decision, SchedulerView
from engine_adapter.errors import is_count
from policies.protocol import check_setting


@dataclass
class RandomPolicy:
    seed: int = 0
    admission_levels: int = 4
    start_prob: float = 0.5
    name: str = "random"
    mode: str = "layered"
    rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_setting(self.name, "admission_levels", self.admission_levels,
                      is_count(self.admission_levels), "a positive integer")
        check_setting(self.name, "start_prob", self.start_prob,
                      isinstance(self.start_prob, (int, float)) and 0 <= self.start_prob <= 1,
                      "a probability in [0, 1]")
        self.rng = np.random.default_rng(self.seed)

    def decide(self, view: SchedulerView) -> Decision:
        idle = not view.decode_context_lens and not view.in_flight
        if not idle and self.rng.random() >= self.start_prob:
            return Decision.wait()
        level = int(self.rng.integers(self.admission_levels))
        admit = view.level_admission(level, self.admission_levels)  # as the env's levels
        g = int(self.rng.integers(1, view.num_layers + 1))
        return Decision(g, admit) if admit else Decision.wait()

    __call__ = decide
