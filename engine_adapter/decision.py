"""The policy protocol: at each decision point a policy sees a SchedulerView and returns a Decision.

The environment, the evaluation scripts and the server all drive the engine through this one
protocol. The view also computes what an admission would get (tokens, KV blocks), so policies
and the scheduler share one piece of arithmetic and an invalid decision is caught, not changed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from mypy_extensions import mypyc_attr

from engine_adapter.errors import InvalidDecision, is_count


@mypyc_attr(native_class=False)  # (compiled: made by policies, of what they pass)
@dataclass(frozen=True)
class Decision:
    """Start a prefill batch of ``admit`` (in this order) split into ``num_groups`` layer groups,
    of at most ``budget`` prefill tokens (None: the engine's prefill budget; never above it):
    each admitted request gets what is left of it, the last a piece of its prompt if need be.

    An empty ``admit`` means wait: no batch starts this iteration.
    """

    num_groups: int = 1
    admit: tuple[str, ...] = ()
    budget: int | None = None

    def __post_init__(self) -> None:
        # Policies pass numpy's integers and lists (an RL action's); what a policy gives is
        # checked here, where it is made, and kept as Python's (what reports and JSON carry).
        # (Read untyped: the fields hold whatever was passed until checked.)
        raw: Any = self
        if not is_count(raw.num_groups):
            raise InvalidDecision(f"num_groups must be an integer of at least 1, got "
                                  f"{raw.num_groups!r}")
        if not isinstance(raw.admit, (tuple, list)):
            raise InvalidDecision(f"a decision admits a tuple of request ids, got "
                                  f"{raw.admit!r}")
        if len(set(raw.admit)) != len(raw.admit):
            raise InvalidDecision(f"admission lists a request twice: {tuple(raw.admit)}")
        if raw.budget is not None and not is_count(raw.budget):
            raise InvalidDecision(f"a decision's token budget must be a positive integer or "
                                  f"None, got {raw.budget!r}")
        object.__setattr__(self, "num_groups", int(raw.num_groups))
        object.__setattr__(self, "admit", tuple(raw.admit))
        if raw.budget is not None:
            object.__setattr__(self, "budget", int(raw.budget))

    @classmethod
    def wait(cls) -> Decision:
        return cls()


class WaitingRequest(NamedTuple):
    """A request in the queue, as a policy sees it. (The view's records are named tuples:
    one view per decision point, made fast.)"""

    request_id: str
    arrival_time: float
    prompt_len: int
    num_computed: int  # tokens already in the KV cache (earlier pieces)
    num_uncomputed: int  # tokens the next prefill must still compute
    blocks_held: int


class InFlightBatch(NamedTuple):
    batch_id: int
    num_groups: int
    stage: int  # the stage it runs in the coming iteration
    num_tokens: int


class EngineStats(NamedTuple):
    """Recent engine behaviour, as exponential moving averages (the engine updates them)."""

    iteration_latency_s: float = 0.0
    arrival_rate: float = 0.0  # requests per second
    energy_per_token_j: float = 0.0


class SchedulerView(NamedTuple):
    """What a policy may see when a prefill batch can be formed. (Immutable: a named tuple,
    made at every decision point, twice as fast to make as a frozen dataclass.)"""

    now: float
    iteration: int
    mode: str
    num_layers: int
    prefill_budget: int
    block_size: int
    free_blocks: int
    max_num_seqs: int
    num_running: int  # requests holding KV: decoding, in flight, or partly prefilled
    num_blocks: int
    waiting: tuple[WaitingRequest, ...]
    decode_context_lens: tuple[int, ...]
    in_flight: tuple[InFlightBatch, ...]
    stats: EngineStats = EngineStats()

    def allot(self, decision: Decision) -> list[tuple[WaitingRequest, int]]:
        """Tokens each admitted request gets, in order; raises InvalidDecision if impossible."""
        if decision.num_groups > self.num_layers:
            raise InvalidDecision(
                f"num_groups must be an integer in 1..{self.num_layers} (the layer count), "
                f"got {decision.num_groups}")
        by_id = {w.request_id: w for w in self.waiting}
        unknown = [r for r in decision.admit if r not in by_id]
        if unknown:
            raise InvalidDecision(f"admission names requests that are not waiting: {unknown}")
        cap = self.prefill_budget if decision.budget is None else min(decision.budget,
                                                                       self.prefill_budget)
        budget, blocks, new_seqs = cap, 0, 0
        allotment = []
        for rid in decision.admit:
            w = by_id[rid]
            if budget <= 0:
                raise InvalidDecision(
                    f"request {rid} gets no tokens: the batch already fills its budget of "
                    f"{cap} tokens")
            tokens = min(w.num_uncomputed, budget)
            budget -= tokens
            room = blocks + self._room_to_admit(w, tokens)
            if room > self.free_blocks:
                whole = " (its whole prompt must fit, as vLLM admits)" if not w.blocks_held else ""
                raise InvalidDecision(
                    f"admission needs {room} free KV blocks by request {rid}{whole}, only "
                    f"{self.free_blocks} are free")
            blocks += self._blocks_to_admit(w, tokens)
            new_seqs += w.blocks_held == 0
            allotment.append((w, tokens))
        if self.num_running + new_seqs > self.max_num_seqs:
            raise InvalidDecision(
                f"admission would run {self.num_running + new_seqs} requests, more than "
                f"max_num_seqs={self.max_num_seqs}")
        return allotment

    def fcfs_admission(self, budget: int | None = None, within: int | None = None
                       ) -> tuple[str, ...]:
        """The longest first-come-first-served prefix of the queue that fits the budget
        (default: the prefill budget; the last request a piece of its prompt if need be), the
        free KV blocks (a request holding none needs room for its whole prompt, as vLLM
        admits: ``_room_to_admit``) and ``max_num_seqs``. With ``within``, only the requests
        that start within the batch's first ``within`` tokens: fewer, each as much of its
        prompt as the budget allows (what an env admission level admits)."""
        budget = self.prefill_budget if budget is None else min(budget, self.prefill_budget)
        blocks, seqs, used = self.free_blocks, self.num_running, 0
        admitted: list[str] = []
        for w in self.waiting:
            if budget <= 0 or (within is not None and used >= within):
                break
            tokens = min(w.num_uncomputed, budget)
            need = self._blocks_to_admit(w, tokens)
            if (self._room_to_admit(w, tokens) > blocks
                    or (w.blocks_held == 0 and seqs >= self.max_num_seqs)):
                break
            admitted.append(w.request_id)
            budget -= tokens
            used += tokens
            blocks -= need
            seqs += w.blocks_held == 0
        return tuple(admitted)

    def level_share(self, level: int, levels: int) -> int:
        """The batch's first ``(level + 1) / levels`` of the prefill budget (at least 1)."""
        return max(1, self.prefill_budget * (level + 1) // levels)

    def level_admission(self, level: int, levels: int) -> tuple[str, ...]:
        """Admission level ``level`` of ``levels``, as the env's action and the policies that
        choose among the same levels mean it: the FCFS prefix of the requests that start
        within ``level_share``, each as the whole budget allows (the top level: the engine's
        FCFS fill). Every level admits the queue's head if it fits (``admits_any``)."""
        return self.fcfs_admission(within=self.level_share(level, levels))

    def admits_any(self, budget: int | None = None) -> bool:
        """Whether ``fcfs_admission(budget)`` admits anyone (whatever ``within``): whether
        the queue's head fits."""
        budget = self.prefill_budget if budget is None else min(budget, self.prefill_budget)
        if not self.waiting or budget <= 0:
            return False
        w = self.waiting[0]
        return (self._room_to_admit(w, min(w.num_uncomputed, budget)) <= self.free_blocks
                and (w.blocks_held > 0 or self.num_running < self.max_num_seqs))

    def _blocks_to_admit(self, w: WaitingRequest, tokens: int) -> int:
        """KV blocks ``w`` must add to take ``tokens`` more of its prompt."""
        return -(-(w.num_computed + tokens) // self.block_size) - w.blocks_held

    def _room_to_admit(self, w: WaitingRequest, tokens: int) -> int:
        """Free KV blocks ``w`` needs to be admitted with ``tokens`` more: the blocks it
        adds, and where it holds none (new, or preempted for recompute) room for all it has
        to compute. vLLM's admission (``scheduler_reserve_full_isl``, on by default in 0.32):
        a request whose later pieces could not fit does not start, to be preempted later."""
        need = self._blocks_to_admit(w, tokens)
        if w.blocks_held:
            return need
        return max(need, -(-(w.num_computed + w.num_uncomputed) // self.block_size))

    def tokens_of(self, admit: Sequence[str]) -> int:
        return sum(t for _, t in self.allot(Decision(1, tuple(admit))))


DecisionFunction = Callable[[SchedulerView], Decision]
