"""What the scheduler asks an executor to run (IterationPlan) and what comes back
(IterationReport)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from mypy_extensions import mypyc_attr

from engine_adapter.compiled import picklable


class Segment(NamedTuple):
    """Consecutive positions ``[start, start + length)`` of one request.

    ``token_ids`` are filled where the rows must be embedded (decode rows and a batch's first
    stage). ``sample`` marks a segment whose last row yields the request's next token. (A
    named tuple: the scheduler makes one per decode row per iteration, three times faster
    than a frozen dataclass.)
    """

    request_id: str
    start: int
    length: int
    block_table: tuple[int, ...]
    sample: bool
    token_ids: tuple[int, ...] | None = None

    @property
    def end(self) -> int:
        return self.start + self.length


class StageWork(NamedTuple):
    """Stage ``stage`` (0-based) of prefill batch ``batch_id``: its rows through layers
    ``[layer_start, layer_end)``."""

    batch_id: int
    stage: int
    num_groups: int
    layer_start: int
    layer_end: int
    segments: tuple[Segment, ...]

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_groups - 1

    @property
    def num_tokens(self) -> int:
        return sum(s.length for s in self.segments)

    def covers(self, layer: int) -> bool:
        return self.layer_start <= layer < self.layer_end


class IterationPlan(NamedTuple):
    """One iteration: the decode batch passes every layer, each stage its layer range."""

    iteration: int
    mode: str
    num_layers: int
    decode: tuple[Segment, ...]
    stages: tuple[StageWork, ...]
    cancelled_batches: tuple[int, ...] = ()

    @property
    def num_decode_tokens(self) -> int:
        return len(self.decode)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(s.num_tokens for s in self.stages)

    def schedule_key(self) -> tuple:
        """Which tokens of which request ran through which layers: for comparing backends."""
        return (
            tuple((s.request_id, s.start, s.length) for s in self.decode),
            tuple((st.batch_id, st.layer_start, st.layer_end,
                   tuple((s.request_id, s.start, s.length) for s in st.segments))
                  for st in self.stages),
        )


class IterationRun(NamedTuple):
    """Up to ``max_iterations`` iterations that need no decision and change nothing but
    positions and stages: the same decode rows, each one position further per iteration, and at
    most one prefill batch in flight, one stage further per iteration up to its last stage
    (``batch_end``), or in chunked mode one prompt's chunks, one per iteration, up to before
    its last. Where nothing waits and every request of the batch samples its first token at
    its last stage, the run goes on past it: those requests (``joined``) decode beside the
    others from the next iteration on. What the simulator prices in one call instead of one
    plan per iteration (``Scheduler.plan_run``)."""

    first_iteration: int
    mode: str
    num_layers: int
    decode: tuple[Segment, ...]  # the first iteration's rows
    stages: tuple[StageWork, ...]  # the first iteration's stage (none, or one batch's)
    stage_bounds: Sequence[tuple[int, int]]  # that batch's layer groups
    max_iterations: int
    # Chunked mode: each iteration's stage is a new one-stage batch (the next id) taking the
    # next ``chunk`` tokens of the same prompt (none of them its last).
    chunk: int = 0
    # The batch's requests as decode rows at their first decode position, where the run goes
    # on past the batch's last stage (none otherwise).
    joined: tuple[Segment, ...] = ()

    @property
    def num_tokens(self) -> int:
        """Rows in each of its iterations up to the batch's last stage."""
        return len(self.decode) + sum(st.num_tokens for st in self.stages)

    @property
    def batch_end(self) -> int | None:
        """The iteration (counted from 0) running its batch's last stage (None: no batch, or
        chunks)."""
        if not self.stages or self.chunk:
            return None
        st = self.stages[0]
        return st.num_groups - 1 - st.stage

    @property
    def join_at(self) -> int:
        """The first iteration its joined rows decode in: the one after its batch's end (0:
        none join)."""
        end = self.batch_end
        return end + 1 if self.joined and end is not None else 0

    def after_batch(self) -> IterationRun:
        """Its iterations after the batch's last stage, as a decode-only run of their own:
        the decode rows, then the joined ones (the order the scheduler appends them in)."""
        j = self.join_at
        decode = tuple(Segment(s.request_id, s.start + j, 1, s.block_table, s.sample,
                               s.token_ids) for s in self.decode) + self.joined
        return IterationRun(self.first_iteration + j, self.mode, self.num_layers, decode, (), (),
                            self.max_iterations - j)

    def iteration_tokens(self, iterations: int) -> list[int]:
        """Rows in each of its first ``iterations`` iterations."""
        before = self.num_tokens
        if not self.joined:
            return [before] * iterations
        j = self.join_at
        return [before] * min(j, iterations) + [len(self.decode) + len(self.joined)] * max(
            0, iterations - j)

    def plan(self, i: int = 0) -> IterationPlan:
        """Its ``i``-th iteration, as ``Scheduler.schedule`` would plan it."""
        if self.joined and i >= self.join_at:
            return self.after_batch().plan(i - self.join_at)
        if i == 0:
            return IterationPlan(self.first_iteration, self.mode, self.num_layers, self.decode,
                                 self.stages)
        decode = tuple(Segment(s.request_id, s.start + i, 1, s.block_table, s.sample,
                               s.token_ids) for s in self.decode)
        if self.chunk:
            stages = tuple(StageWork(st.batch_id + i, 0, 1, st.layer_start, st.layer_end, tuple(
                Segment(s.request_id, s.start + i * self.chunk, s.length, s.block_table,
                        False, s.token_ids) for s in st.segments)) for st in self.stages)
        else:
            stages = tuple(StageWork(st.batch_id, st.stage + i, st.num_groups,
                                     *self.stage_bounds[st.stage + i], st.segments)
                           for st in self.stages)
        return IterationPlan(self.first_iteration + i, self.mode, self.num_layers, decode,
                             stages)


@dataclass(frozen=True)
class TokenEvent:
    """Request ``request_id`` emitted its ``index``-th output token ``token_id`` at ``time``."""

    request_id: str
    index: int
    token_id: int
    time: float


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # (compiled: copied with the env)
@dataclass
class ExecutionResult:
    """What an executor measured while running a plan."""

    latency_s: float
    sampled: dict[str, int]
    # Tokens routed to each expert, per layer (None for dense layers and layers not run);
    # a simulator that models only how many experts were hit gives ``distinct`` instead.
    expert_tokens: list[list[int] | None]
    energy_j: float | None = None  # measured energy, where the device has a counter
    logits: dict[str, Any] | None = None  # last-row logits per sampled request, when captured
    distinct: list[int | None] | None = None
    traffic: Any = None  # a Traffic, where the executor already counted it (cost model)

    @property
    def distinct_experts(self) -> list[int | None]:
        """Experts that received at least one token, per layer."""
        if self.distinct is not None:
            return self.distinct
        return [None if c is None else sum(1 for x in c if x > 0) for c in self.expert_tokens]


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # (compiled: copied with the env)
@dataclass
class RunResult:
    """What an executor priced for the first iterations of an IterationRun (those starting
    before the run's deadline): per iteration, what the engine reports and pays energy for."""

    times: list[float]  # the run's start, then each iteration's end
    expert_bytes: list[int]
    moved_bytes: list[int]  # weights and KV cache read and written
    flops: list[int]
    token: int = 0  # the token each iteration emits per request (the simulator's placeholder)

    @property
    def iterations(self) -> int:
        return len(self.times) - 1

    @classmethod
    def of(cls, times: list[float], parts: list[tuple[Any, int]], ran: int) -> RunResult:
        """The first ``ran`` iterations of a run priced in consecutive ``parts`` (a Traffic
        whose fields are lists over its iterations, or constants, and how many it covers)."""
        expert: list[int] = []
        moved: list[int] = []
        flops: list[int] = []
        left = ran
        for traffic, n in parts:
            n = min(n, left)
            if n <= 0:
                break
            left -= n
            eb, wb, kb, fl = (traffic.expert_bytes, traffic.weight_bytes, traffic.kv_bytes,
                              traffic.flops)
            if isinstance(wb, list):  # one value per iteration of the part
                expert += eb[:n]
                moved += [w + v for w, v in zip(wb[:n], kb[:n])]
                flops += fl[:n]
            else:  # one iteration's, the same in each
                expert += [eb if type(eb) is int else int(eb)] * n
                moved += [int(wb + kb)] * n
                flops += [fl if type(fl) is int else int(fl)] * n
        return cls(times, expert, moved, flops)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # (compiled: copied with the env)
@dataclass
class IterationReport:
    """Everything one iteration did and cost."""

    iteration: int
    mode: str
    start_time: float
    latency_s: float
    decode_tokens: int
    prefill_tokens: int
    stages: list[dict]
    distinct_experts: list[int | None]
    expert_bytes: int
    weight_bytes: int
    kv_bytes: int
    flops: int
    energy_j: float
    energy_source: str
    events: list[TokenEvent] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    logits: dict[str, Any] | None = None  # only when the executor captures logits (tests)

    @property
    def end_time(self) -> float:
        return self.start_time + self.latency_s

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # (compiled: copied with the env)
@dataclass
class RunReport:
    """What an IterationRun did: ``iterations`` iterations, each what an IterationReport
    would say of it, in lists (bytes and FLOPs summed where only sums are kept)."""

    first_iteration: int
    iterations: int
    times: list[float]  # the run's start, then each iteration's end
    latencies: list[float]
    request_ids: tuple[str, ...]  # the decode rows: each emits a token at every iteration's end
    first_token_index: tuple[int, ...]  # the output index of each one's first token here
    energy_j: list[float]
    expert_bytes: int
    total_bytes: int
    flops: int
    energy_source: str
    finished: list[str] = field(default_factory=list)
    # (request, output index) of the tokens the batch in flight emitted as it ended, at the
    # end of iteration ``emitted_at`` (its last stage; counted from 0, -1: the last). Where
    # that is not the run's last, those requests then emit at every later iteration's end.
    emitted: tuple[tuple[str, int], ...] = ()
    emitted_at: int = -1

    @property
    def start_time(self) -> float:
        return self.times[0]

    @property
    def end_time(self) -> float:
        return self.times[-1]

picklable(TokenEvent)
