"""A random policy: uniformly random G and admission level; starts with probability
``start_prob`` (it never waits forever: it starts whenever nothing else runs)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine_adapter.decision import Decision, SchedulerView


@dataclass
class RandomPolicy:
    seed: int = 0
    admission_levels: int = 4
    start_prob: float = 0.5
    name: str = "random"
    mode: str = "layered"
    rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def decide(self, view: SchedulerView) -> Decision:
        idle = not view.decode_context_lens and not view.in_flight
        if not idle and self.rng.random() >= self.start_prob:
            return Decision.wait()
        level = int(self.rng.integers(self.admission_levels))
        # (as the env's admission levels: lpenv.actions.ActionCodec)
        admit = view.fcfs_admission(within=max(1, view.prefill_budget * (level + 1)
                                               // self.admission_levels))
        g = int(self.rng.integers(1, view.num_layers + 1))
        return Decision(g, admit) if admit else Decision.wait()

    __call__ = decide
