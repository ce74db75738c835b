"""An SLO-aware heuristic: admission and G from the engine's cost estimate.

At each decision point it prices candidate batches (first-come-first-served prefixes at
several token-budget levels, times every G) with the cost model, iteration by iteration, with
the decode batch and any batch in flight alongside:

1. Nothing to stall (no decode batch): take the whole budget with G = 1, the fastest first
   token and one read of every expert.
2. Otherwise keep every coming iteration under ``headroom x TBT SLO``: among candidates whose
   priced iterations all fit, admit the most tokens; on a tie, the smallest G (first token
   sooner). If the queue's head is already past ``urgency`` of its TTFT SLO, prefer the
   candidate whose first token comes soonest among those that fit.
3. If nothing fits, wait: a batch now would make every decoding request miss its TBT SLO,
   while waiting risks one late first token.

Unlike the paper's rule, it may start a batch while another is in flight, when the cost model
says both stages fit in the same iteration.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine_adapter.cost_model import CostModel
from engine_adapter.decision import Decision, SchedulerView
from engine_adapter.errors import is_count
from engine_adapter.scheduler import layer_groups
from policies.protocol import PolicyContext, check_setting


@dataclass
class SloAware:
    context: PolicyContext
    headroom: float = 0.9
    urgency: float = 0.5
    admission_levels: int = 4
    name: str = "slo_aware"
    mode: str = "layered"
    cost: CostModel = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_setting(self.name, "headroom", self.headroom,
                      isinstance(self.headroom, (int, float)) and self.headroom > 0,
                      "positive (a share of the TBT SLO)")
        check_setting(self.name, "urgency", self.urgency,
                      isinstance(self.urgency, (int, float)) and self.urgency >= 0,
                      "non-negative (a share of the TTFT SLO)")
        check_setting(self.name, "admission_levels", self.admission_levels,
                      is_count(self.admission_levels), "a positive integer")
        c = self.context
        self.cost = CostModel(c.model, c.hardware, c.dtype_bytes)

    def _candidates(self, view: SchedulerView) -> list[tuple[str, ...]]:
        seen, out = set(), []
        for level in range(self.admission_levels):
            admit = view.level_admission(level, self.admission_levels)  # as the env's levels
            if admit and (key := (admit, view.tokens_of(admit))) not in seen:
                seen.add(key)
                out.append(admit)
        return out

    def _price(self, view: SchedulerView, admit: tuple[str, ...], g: int) -> list[float]:
        """Latency of each of the G iterations the batch takes, with in-flight stages."""
        pieces = [(w.num_computed, t) for w, t in view.allot(Decision(g, admit))]
        flights = [(layer_groups(view.num_layers, b.num_groups), b.stage, b.num_tokens)
                   for b in view.in_flight]
        times = []
        for k, (lo, hi) in enumerate(layer_groups(view.num_layers, g)):
            stages = [(lo, hi, pieces)]
            for bounds, stage, tokens in flights:
                if stage + k < len(bounds):
                    a, b = bounds[stage + k]
                    stages.append((a, b, [(0, tokens)]))
            times.append(self.cost.predict(view.decode_context_lens, stages))
        return times

    def decide(self, view: SchedulerView) -> Decision:
        candidates = self._candidates(view)
        if not candidates:
            return Decision.wait()
        if not view.decode_context_lens:
            return Decision(1, candidates[-1])  # no decode to stall: fastest first token
        limit = self.headroom * self.context.tbt_slo_s
        head_wait = view.now - view.waiting[0].arrival_time
        urgent = head_wait > self.urgency * self.context.ttft_slo_s
        fitting = []
        for admit in candidates:
            for g in range(1, view.num_layers + 1):
                times = self._price(view, admit, g)
                if max(times) <= limit:
                    fitting.append((view.tokens_of(admit), g, sum(times), admit))
                    break  # a larger G only delays the first token further
        if not fitting:
            # Any batch now would stall every decoding request past its TBT SLO: one late
            # first token is cheaper than many late gaps. Wait for the decode batch to shrink.
            return Decision.wait()
        if urgent:
            _, g, _, admit = min(fitting, key=lambda f: (f[2], -f[0]))
        else:
            _, g, _, admit = max(fitting, key=lambda f: (f[0], -f[1]))
        return Decision(g, admit)

    __call__ = decide
