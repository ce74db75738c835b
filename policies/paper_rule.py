"""The layered-prefill paper's rule: FCFS up to the prefill budget, one batch in flight at a
time, G picked from the batch's prefill tokens (PAPER.md's table)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from engine_adapter.decision import Decision, SchedulerView
from engine_adapter.errors import is_count
from policies.protocol import check_setting

# The paper's thresholds are 512, 1,024, 2,048 and 4,096 prefill tokens: multiples of its
# 512-token chunk. ``unit`` scales them (a CPU-sized run uses a smaller unit).
PAPER_UNIT = 512


def paper_groups(prefill_tokens: int, max_groups: int, num_layers: int,
                 unit: int = PAPER_UNIT) -> int:
    """G for a batch of ``prefill_tokens``: 1, 2, 4, max/2, max across the thresholds.

    With max 16 that is 1/2/4/8/16 and with max 12 it is 1/2/4/6/12, as in the paper.
    """
    # max(4, ...) keeps G non-decreasing in the token count when max_groups < 8.
    levels = (1, 2, 4, max(4, max_groups // 2), max_groups)
    level = sum(prefill_tokens > unit * m for m in (1, 2, 4, 8))
    return max(1, min(levels[level], max_groups, num_layers))


@dataclass
class PaperRule:
    max_groups: int = 16
    unit: int = PAPER_UNIT
    name: str = "paper"
    mode: str = "layered"
    # Parameters whose default is an engine setting where one is known (conf/policy/paper.yaml:
    # ``unit: ${engine.chunk_tokens}``); lpenv-export fills them from its env config alike.
    engine_defaults: ClassVar[dict[str, str]] = {"unit": "chunk_tokens"}

    def __post_init__(self) -> None:
        for key in ("max_groups", "unit"):
            value = getattr(self, key)
            check_setting(self.name, key, value, is_count(value), "a positive integer")

    @property
    def max_in_flight(self) -> int:
        """One batch in flight at a time: the engine need not ask while one is."""
        return 1

    def decide(self, view: SchedulerView) -> Decision:
        if view.in_flight:
            return Decision.wait()
        admit = view.fcfs_admission()
        if not admit:
            return Decision.wait()
        g = paper_groups(view.tokens_of(admit), self.max_groups, view.num_layers, self.unit)
        return Decision(g, admit)

    __call__ = decide
