"""The one scheduler: which tokens of which requests run through which layers next iteration.

Two modes share everything but the forming of prefill batches:

* ``layered``: a policy decides, per prefill batch, the layer-group count G and the admitted
  requests (up to the prefill budget, decode tokens not counted). The batch runs layer group
  k in its k-th iteration; decode tokens pass every layer every iteration.
* ``chunked``: Sarathi-style. Each iteration's token budget goes to decode tokens first, then
  first-come-first-served prompt chunks (the continuing chunk heads the queue), G = 1.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mypy_extensions import mypyc_attr

from engine_adapter.block_manager import BlockManager
from engine_adapter.decision import (
    Decision,
    DecisionFunction,
    EngineStats,
    InFlightBatch,
    SchedulerView,
    WaitingRequest,
)
from engine_adapter.errors import InvalidDecision
from engine_adapter.plan import IterationPlan, IterationRun, Segment, StageWork
from engine_adapter.request import Request, RequestStatus

MODES = ("layered", "chunked")


def layer_groups(num_layers: int, num_groups: int) -> list[tuple[int, int]]:
    """Contiguous layer ranges, sized as ``numpy.array_split`` sizes them."""
    size, extra = divmod(num_layers, num_groups)  # the first ``extra`` groups get one more
    bounds, start = [], 0
    for g in range(num_groups):
        end = start + size + (g < extra)
        bounds.append((start, end))
        start = end
    return bounds


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # (compiled: copied with the env)
@dataclass
class PrefillBatch:
    batch_id: int
    num_groups: int
    bounds: list[tuple[int, int]]
    segments: tuple[Segment, ...]
    stage: int = 0


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # (compiled: copied with the env)
@dataclass
class StepOutcome:
    """Token emissions (request, output index, token) and lifecycle changes of an iteration."""

    emitted: list[tuple[str, int, int]] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # (compiled: copied with the env)
class Scheduler:
    def __init__(
        self,
        mode: str,
        num_layers: int,
        block_manager: BlockManager,
        prefill_budget: int,
        chunk_tokens: int,
        max_num_seqs: int,
        decide: DecisionFunction | None = None,
        with_data: bool = True,
        max_in_flight: int | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"scheduling mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.num_layers = num_layers
        self.blocks = block_manager
        self.prefill_budget = prefill_budget
        self.chunk_tokens = chunk_tokens
        self.max_num_seqs = max_num_seqs
        # (what a policy returns is checked: _check_decision)
        self.decide: Callable[[SchedulerView], object] | None = decide
        # Plans carry block tables and token ids for executors that touch tensors; the
        # simulator needs neither, and copying them each iteration is most of its time.
        self.with_data = with_data
        self.max_in_flight = max_in_flight  # at the cap no batch starts: no decision is asked
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.decoding: list[Request] = []
        self.batches: list[PrefillBatch] = []
        self.iteration = 0
        self._next_batch_id = 0
        self._admit_order: dict[str, int] = {}
        self._admit_counter = 0
        # Requests preempted, and batches cancelled, since the last plan: they belong to the
        # next plan made (a refused decision in between must not lose them: the executor
        # drops a cancelled batch's carried activations when a plan says so).
        self._preempted: list[str] = []
        self.preempted_last: list[str] = []  # the last plan's, for its report
        self._prepared = False
        self._held_back = False  # chunked mode: a preemption this iteration, no admission
        self._view: SchedulerView | None = None
        self._cancelled: list[int] = []
        self.stats = EngineStats()

    # ---- requests -------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self._view = None

    def abort(self, request_id: str) -> None:
        """Stop a request now; its KV blocks are freed as soon as no stage still writes them."""
        req = self.requests.get(request_id)
        if req is None:
            raise KeyError(f"unknown or finished request {request_id!r}")
        if req.status == RequestStatus.ABORTED:
            return  # already aborting: its batch frees it
        self._view = None
        if req.status == RequestStatus.PREFILLING:
            req.status = RequestStatus.ABORTED  # its batch frees it when the batch ends
            batch = next(b for b in self.batches if b.batch_id == req.batch_id)
            if all(self.requests[s.request_id].status == RequestStatus.ABORTED
                   for s in batch.segments):  # computing for nobody: cancelled now
                self.batches.remove(batch)
                for seg in batch.segments:
                    self._retire(self.requests[seg.request_id], RequestStatus.ABORTED)
                self._cancelled.append(batch.batch_id)
        else:
            self._retire(req, RequestStatus.ABORTED)

    def phase(self, request_id: str) -> str:
        """Where a request is, in words: ``waiting``, ``prefilling stage k/G (batch b)``,
        ``decoding``; finished and aborted requests are no longer known here."""
        req = self.requests[request_id]
        if req.status == RequestStatus.PREFILLING:
            b = next(b for b in self.batches if b.batch_id == req.batch_id)
            return f"prefilling stage {b.stage + 1}/{b.num_groups} (batch {b.batch_id})"
        if req.status == RequestStatus.WAITING and req.num_computed:
            return f"waiting ({req.num_computed}/{req.num_tokens} tokens computed)"
        return req.status.value

    @property
    def at_cap(self) -> bool:
        """Whether the prefill batches in flight are at ``max_in_flight`` (none can start)."""
        return self.max_in_flight is not None and len(self.batches) >= self.max_in_flight

    def has_work(self) -> bool:
        return bool(self.waiting or self.decoding or self.batches)

    @property
    def num_running(self) -> int:
        return sum(1 for r in self.requests.values() if r.block_table)

    # ---- one iteration --------------------------------------------------------------------
    def prepare(self, now: float) -> None:
        """Give decodes their KV slots (preempting if needed) before anything is decided.

        Idempotent until the next ``schedule``: the env and a server may look at
        ``decision_view`` first and decide later.
        """
        if self._prepared:
            return
        preempted = len(self._preempted)
        self._cancelled += self._grow_decodes()
        if self.mode == "chunked" and self.waiting:
            self._cancelled += self._grow_chunk()
        # As vLLM: an iteration that preempted admits no one new (the room it made is for the
        # requests running; where none runs, admission goes on, or nothing would).
        self._held_back = (self.mode == "chunked" and len(self._preempted) > preempted
                           and bool(self.decoding or self.batches))
        if self.waiting:
            self._unblock_head(now)
        self._prepared = True

    def decision_view(self, now: float) -> SchedulerView | None:
        """The view a policy decides on, or None when this iteration needs no decision
        (nothing waits, no batch can start (``max_in_flight``), or chunked mode, which admits
        first come first served itself)."""
        self.prepare(now)
        if self.mode == "chunked" or not self.waiting or self.at_cap:
            return None
        if self._view is None or self._view.now != now:
            self._view = self.view(now)  # kept for schedule(): nothing changes in between
        return self._view

    def schedule(self, now: float, decision: Decision | None = None) -> IterationPlan | None:
        """The next iteration's plan. In layered mode ``decision`` (or, if None, the policy's)
        says whether and how a new prefill batch starts."""
        self.prepare(now)
        self._check_decision(decision)
        self._take_decision(now, decision)
        if not self.decoding and not self.batches:
            return None  # (what was cancelled or preempted goes with the next plan)
        cancelled, self._cancelled = self._cancelled, []
        self.preempted_last, self._preempted = self._preempted, []
        if self.with_data:
            decode = tuple(
                Segment(r.request_id, r.num_computed, 1, tuple(r.block_table), True,
                        (r.token_at(r.num_computed),))
                for r in self.decoding)
        else:
            decode = tuple(Segment(r.request_id, r.num_computed, 1, (), True)
                           for r in self.decoding)
        stages = []
        for b in self.batches:
            lo, hi = b.bounds[b.stage]
            segs = b.segments if b.stage == 0 else tuple(
                Segment(s.request_id, s.start, s.length, s.block_table, s.sample)
                for s in b.segments)
            stages.append(StageWork(b.batch_id, b.stage, b.num_groups, lo, hi, segs))
        plan = IterationPlan(self.iteration, self.mode, self.num_layers, decode, tuple(stages),
                             tuple(cancelled))
        self.iteration += 1
        return plan

    def plan_run(self, now: float, limit: int, decision: Decision | None = None
                 ) -> IterationRun | None:
        """The coming iterations as one run, where none after the first needs a decision and
        nothing changes but positions and stages (None otherwise: ``schedule`` goes on). The
        first may take ``decision`` (a layered batch starting now). Then nothing waits (or no
        batch can start: ``max_in_flight``), at most one batch is in flight, and the run stops
        at that batch's last stage (or, where nothing waits and each of its requests samples
        there, goes on with them decoding: ``IterationRun.joined``), at the last token of its
        first decode request to finish and where its KV growth would outrun the free blocks. In
        chunked mode, while requests wait, the run is the queue's head's chunks
        (``_plan_chunks``). Each of its iterations is the plan ``schedule`` would make;
        ``commit_run`` applies as many as ran."""
        self.prepare(now)  # the first iteration's KV slots (and preemptions, if any)
        self._check_decision(decision)
        if self._preempted or self._cancelled or len(self.batches) > 1:
            return None
        due = bool(self.waiting) and not self.at_cap  # a decision is due this iteration
        if due and self.mode == "chunked" and decision is None:
            return self._plan_chunks(now, limit)
        starts = due and decision is not None and bool(decision.admit)
        if due and (decision is None or self.mode == "chunked"):
            return None  # the policy (or first come, first served) decides in ``schedule``
        if starts and self.batches:
            return None  # two batches in flight
        capped_after = self.max_in_flight is not None and self.max_in_flight <= 1
        admitted = len(decision.admit) if decision is not None else 0
        if due and (not starts or admitted < len(self.waiting) and not capped_after):
            return None  # requests would wait with a decision due next: one iteration alone
        if not (self.decoding or self.batches or starts):
            return None
        if due:
            self._take_decision(now, decision)
        k = 1 if self.waiting and not self.at_cap else limit  # a decision due next: just one
        decode = []
        for r in self.decoding:
            left = r.max_tokens - len(r.output_token_ids)
            if left < k:
                k = left
            decode.append(Segment(r.request_id, r.num_computed, 1, (), True))
        stages: tuple[StageWork, ...] = ()
        bounds: tuple[tuple[int, int], ...] = ()
        joined: tuple[Segment, ...] = ()
        end = 0
        if self.batches:
            b = self.batches[0]
            end = b.num_groups - b.stage  # iterations up to and including its last stage
            stages = (StageWork(b.batch_id, b.stage, b.num_groups, *b.bounds[b.stage],
                                b.segments),)
            bounds = tuple(b.bounds)
            if k > end and self._joins(b):
                # Its requests decode from the next iteration on, up to the first to finish.
                for s in b.segments:
                    r = self.requests[s.request_id]
                    k = min(k, end - 1 + r.max_tokens - len(r.output_token_ids))
                joined = tuple(Segment(s.request_id, s.end, 1, (), True) for s in b.segments)
            else:
                k = min(k, end)  # its last stage ends the run
        return IterationRun(self.iteration, self.mode, self.num_layers, tuple(decode), stages,
                            bounds, self._fitting(k, joined=joined, join_at=end), joined=joined)

    def _joins(self, batch: PrefillBatch) -> bool:
        """Whether a run may go on past ``batch``'s last stage: nothing waits (no decision is
        due after it) and each of its requests samples its first token there (none goes back
        to the queue, none was aborted)."""
        return not self.waiting and all(
            s.sample and self.requests[s.request_id].status == RequestStatus.PREFILLING
            for s in batch.segments)

    def _plan_chunks(self, now: float, limit: int) -> IterationRun | None:
        """Chunked mode's run: the queue's head alone fills each iteration's chunk budget,
        one chunk after the other, up to before its prompt's last (which samples its first
        token and joins the decode batch)."""
        if self.batches:
            return None
        view = self._view if self._view is not None and self._view.now == now else self.view(now)
        if len(view.fcfs_admission()) != 1:
            return None  # nobody fits, or the chunk takes more than one request
        head, chunk = self.waiting[0], view.prefill_budget
        k = min(limit, (head.num_uncomputed - 1) // chunk)
        for r in self.decoding:
            k = min(k, r.max_tokens - len(r.output_token_ids))
        if k < 1:
            return None
        k = self._fitting(k, head, chunk)
        segment = Segment(head.request_id, head.num_computed, chunk, (), False, ())
        decode = tuple(Segment(r.request_id, r.num_computed, 1, (), True) for r in self.decoding)
        return IterationRun(self.iteration, self.mode, self.num_layers, decode, (StageWork(
            self._next_batch_id, 0, 1, 0, self.num_layers, (segment,)),),
            ((0, self.num_layers),), k, chunk)

    def _fitting(self, k: int, head: Request | None = None, chunk: int = 0,
                 joined: tuple[Segment, ...] = (), join_at: int = 0) -> int:
        """The most of ``k`` iterations whose KV growth (``_run_growth``) the free blocks
        hold, halving. Iteration 0 always fits: its decode slots are prepared, and first come,
        first served admitted a chunk's blocks."""
        bs, free = self.blocks.block_size, self.blocks.num_free
        # (each row grows at most every block_size iterations: mostly, room to spare)
        bound = (len(self.decoding) + len(joined)) * (k // bs + 1)
        if head is not None:
            bound += -(-(head.num_computed + k * chunk) // bs) - len(head.block_table)
        if bound > free:
            while k > 1 and len(self._run_growth(k, head, chunk, joined, join_at)) > free:
                k //= 2
        return k

    def _run_growth(self, iterations: int, head: Request | None = None, chunk: int = 0,
                    joined: tuple[Segment, ...] = (), join_at: int = 0) -> list[Request]:
        """The requests given a block by the first ``iterations`` of a run, in the order one
        iteration after the other would give them: in each, ``_grow_decodes`` in decode order
        (the ``joined`` rows last, from iteration ``join_at`` on), then (a chunked run) the
        blocks ``head``'s chunk needs."""
        bs = self.blocks.block_size
        grows = []
        for j, r in enumerate(self.decoding):
            first = len(r.block_table) * bs - r.prompt_len - len(r.output_token_ids) + 1
            if first < iterations:  # (most rows, most runs: room in their last block)
                grows += [(i, 0, j) for i in range(first, iterations, bs)]
        rows = self.decoding
        if joined:
            rows = list(rows)
        for s in joined:  # at iteration i it holds s.start + 1 + (i - join_at) tokens
            r = self.requests[s.request_id]
            grows += [(i, 0, len(rows)) for i in range(
                len(r.block_table) * bs - s.start + join_at, iterations, bs)]
            rows.append(r)
        if head is not None:
            held = len(head.block_table)
            for i in range(iterations):
                need = -(-(head.num_computed + (i + 1) * chunk) // bs)
                grows += [(i, 1, 0)] * (need - held)
                held = max(held, need)
        grows.sort()
        if head is None:
            return [rows[j] for _, _, j in grows]
        return [head if kind else rows[j] for _, kind, j in grows]

    def commit_run(self, run: IterationRun, iterations: int, token: int) -> StepOutcome:
        """Apply the first ``iterations`` of ``run`` as that many ``schedule`` and
        ``postprocess`` calls would (the same KV blocks in the same order, every token
        ``token``). The outcome lists the requests that finished and, where the batch ended
        in the run, its emissions (the decode rows' tokens, and after the batch's end its
        requests', are the run's own)."""
        if not 1 <= iterations <= run.max_iterations or run.first_iteration != self.iteration:
            raise ValueError(f"cannot commit {iterations} iterations of a run of "
                             f"{run.max_iterations} planned at iteration {run.first_iteration}")
        head = self.waiting[0] if run.chunk else None
        join_at = run.join_at
        self.blocks.add_one(self._run_growth(iterations, head, run.chunk, run.joined, join_at))
        if head is not None:  # its chunks, each a batch of one stage, as _start_batch made them
            head.num_computed += iterations * run.chunk
            self._note_admitted(head)
            self._next_batch_id += iterations
        emitted = [token] * iterations
        done = []
        for req in self.decoding:
            req.num_computed += iterations
            req.output_token_ids += emitted
            if len(req.output_token_ids) >= req.max_tokens:
                done.append(req)
        out = StepOutcome()

        def finish(done: list[Request]) -> None:
            for req in done:
                self._retire(req, RequestStatus.FINISHED)
            out.finished.extend(r.request_id for r in done)

        after = iterations - join_at if run.joined else 0
        if after <= 0:  # requests finish in the last iteration before a batch ends in it
            finish(done)
            done = []
        if self.batches:  # one at most: on to the stage after the run's last
            (b,) = self.batches
            b.stage += min(iterations, b.num_groups - b.stage) - 1
            self._advance_batches({s.request_id: token for s in b.segments}, out)
            if after > 0:  # its requests then decoded beside the others
                emitted = [token] * after
                for s in run.joined:
                    req = self.requests[s.request_id]
                    req.num_computed += after
                    req.output_token_ids += emitted
                    if len(req.output_token_ids) >= req.max_tokens:
                        done.append(req)
        finish(done)
        self.iteration += iterations
        self._prepared, self._view, self.preempted_last = False, None, []
        return out

    def _check_decision(self, decision: object) -> None:
        """A decision the scheduler cannot take as given is refused, never ignored or
        changed: not a Decision, or one that admits where no batch can start. (A Decision
        checks its own fields where it is made: an admission that is not a sequence of request
        ids, a bare string, would have admitted its characters.)"""
        if decision is None:
            return
        if not isinstance(decision, Decision):
            raise InvalidDecision(
                f"a policy must return a Decision, got {type(decision).__name__}")
        if not decision.admit:
            return
        if self.mode == "chunked":
            raise InvalidDecision("chunked mode admits first come, first served itself: "
                                  "give no decision (or Decision.wait())")
        if self.at_cap:
            raise InvalidDecision(
                f"{len(self.batches)} prefill batches are in flight, the most "
                f"max_batches_in_flight={self.max_in_flight} allows: none can start")
        if not self.waiting:
            raise InvalidDecision(f"no request waits: nothing to admit (admit "
                                  f"{decision.admit})")

    def _take_decision(self, now: float, decision: Decision | None) -> None:
        """The coming iteration's decision (``decision``, the policy's, or first come first
        served in chunked mode), where one is due: its batch starts."""
        self._prepared = False
        cached, self._view = self._view, None
        if not self.waiting or self.at_cap or self._held_back:
            return
        view = cached if cached is not None and cached.now == now else self.view(now)
        if self.mode == "chunked":
            decision = Decision(1, view.fcfs_admission())
        elif decision is None:
            if self.decide is None:
                raise InvalidDecision("requests wait and there is no policy to decide")
            chosen: Any = self.decide(view)
            self._check_decision(chosen)
            decision = chosen
        if decision.admit:
            self._start_batch(view, decision)

    def view(self, now: float) -> SchedulerView:
        budget = self.prefill_budget
        if self.mode == "chunked":
            budget = max(0, self.chunk_tokens - len(self.decoding))
        return SchedulerView(
            now=now, iteration=self.iteration, mode=self.mode, num_layers=self.num_layers,
            prefill_budget=budget, block_size=self.blocks.block_size,
            free_blocks=self.blocks.num_free, max_num_seqs=self.max_num_seqs,
            num_running=self.num_running, num_blocks=self.blocks.num_blocks,
            waiting=tuple(
                WaitingRequest(r.request_id, r.arrival_time, r.prompt_len, r.num_computed,
                               r.num_uncomputed, len(r.block_table))
                for r in self.waiting),
            decode_context_lens=tuple(r.num_tokens for r in self.decoding),
            in_flight=tuple(InFlightBatch(b.batch_id, b.num_groups, b.stage,
                                          sum(s.length for s in b.segments))
                            for b in self.batches),
            stats=self.stats)

    def postprocess(self, plan: IterationPlan, sampled: dict[str, int]) -> StepOutcome:
        out = StepOutcome()
        for seg in plan.decode:
            req = self.requests[seg.request_id]
            req.num_computed += 1
            self._emit(req, sampled[seg.request_id], out)
        self._advance_batches(sampled, out)
        return out

    def _advance_batches(self, sampled: dict[str, int], out: StepOutcome) -> None:
        """Each batch in flight one stage on; one past its last stage ends: its requests
        decode (emitting their first token) or, with more prompt to go, wait at the head."""
        finished_batches = []
        for b in self.batches:
            if b.stage < b.num_groups - 1:
                b.stage += 1
                continue
            finished_batches.append(b)
            for seg in b.segments:
                req = self.requests[seg.request_id]
                if req.status == RequestStatus.ABORTED:
                    self._retire(req, RequestStatus.ABORTED)
                    continue
                req.num_computed += seg.length
                req.batch_id = None
                if seg.sample:
                    req.status = RequestStatus.DECODING
                    self.decoding.append(req)
                    self._emit(req, sampled[seg.request_id], out)
                else:
                    req.status = RequestStatus.WAITING
                    self.waiting.appendleft(req)  # the continuing piece heads the queue
        for b in finished_batches:
            self.batches.remove(b)

    # ---- internals ------------------------------------------------------------------------
    def _emit(self, req: Request, token: int, out: StepOutcome) -> None:
        req.output_token_ids.append(token)
        out.emitted.append((req.request_id, len(req.output_token_ids) - 1, token))
        if len(req.output_token_ids) >= req.max_tokens:
            self._retire(req, RequestStatus.FINISHED)
            out.finished.append(req.request_id)

    def _retire(self, req: Request, status: RequestStatus) -> None:
        self.blocks.free(req)
        req.status = status
        if req in self.decoding:
            self.decoding.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        self.requests.pop(req.request_id, None)
        self._admit_order.pop(req.request_id, None)

    def _grow_decodes(self) -> list[int]:
        """Give every decoding request a KV slot for its next token, in order, preempting
        the most recently admitted holders of KV blocks where there is none: the request
        itself, where it is the latest (as vLLM preempts)."""
        cancelled: list[int] = []
        capacity = self.blocks.block_size
        for req in list(self.decoding):
            if req.status != RequestStatus.DECODING:
                continue  # preempted earlier in this loop
            if len(req.block_table) * capacity >= req.num_tokens:
                continue  # its last block has room: most iterations, most requests
            while req.status == RequestStatus.DECODING and not self.blocks.can_grow(
                    req, req.num_tokens):
                cancelled += self._preempt_one()
            if req.status == RequestStatus.DECODING:
                self.blocks.grow(req, req.num_tokens)
        return cancelled

    def _grow_chunk(self) -> list[int]:
        """Chunked mode, as vLLM: the queue's head part way through its prompt takes its
        next chunk like a running request, preempting the most recently admitted holders of
        KV blocks until the chunk fits, itself at the latest (to recompute later, admitted
        again once its whole prompt fits). The batches it cancels."""
        head, cancelled = self.waiting[0], []
        budget = self.chunk_tokens - len(self.decoding)
        while head.block_table and budget > 0 and not self.blocks.can_grow(
                head, head.num_computed + min(head.num_uncomputed, budget)):
            cancelled += self._preempt_one()
        return cancelled

    def _unblock_head(self, now: float) -> None:
        """With nothing running, partly prefilled requests could hold the KV blocks the queue's
        head needs, and nothing would ever free them: preempt them until the head fits."""
        if self.decoding or self.batches:
            return  # running requests will finish and free blocks
        head = self.waiting[0]
        while not (view := self.view(now)).admits_any():
            holders = [r for r in self.waiting if r.block_table and r is not head]
            if not holders:
                return  # the head cannot fit for another reason (max_num_seqs, budget)
            self._preempt(max(holders, key=lambda r: self._admit_order.get(r.request_id, -1)))
            self.waiting.remove(head)
            self.waiting.appendleft(head)  # the preempted request queues behind the head
        self._view = view  # (nothing changes before the decision: the one it is made on)

    def _preempt_one(self) -> list[int]:
        """Preempt (for recompute) the most recently admitted holder of KV blocks; the
        batches it cancels. (Callers hold blocks themselves: there is always one.)"""
        holders = [r for r in self.requests.values() if r.block_table]
        # An aborted request's batch first (it computes for nobody: skipping it jammed the
        # engine when it held the last blocks), then the most recently admitted.
        victim = max(holders, key=lambda r: (r.status == RequestStatus.ABORTED,
                                             self._admit_order.get(r.request_id, -1)))
        if victim.status in (RequestStatus.PREFILLING, RequestStatus.ABORTED):
            # (an aborted request holding blocks is always in a batch in flight: the whole
            # batch goes, its live requests back to the queue)
            batch = next(b for b in self.batches if b.batch_id == victim.batch_id)
            self.batches.remove(batch)
            for seg in reversed(batch.segments):
                self._preempt(self.requests[seg.request_id])
            return [batch.batch_id]
        self._preempt(victim)
        return []

    def _preempt(self, req: Request) -> None:
        if req.status == RequestStatus.ABORTED:
            self._retire(req, RequestStatus.ABORTED)
            return
        self.blocks.free(req)
        if req in self.decoding:
            self.decoding.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        req.num_computed = 0
        req.batch_id = None
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.waiting.appendleft(req)
        self._preempted.append(req.request_id)

    def _note_admitted(self, req: Request) -> None:
        """Its place in the admission order (preemption takes the latest first)."""
        if req.request_id not in self._admit_order:
            self._admit_order[req.request_id] = self._admit_counter
            self._admit_counter += 1

    def _start_batch(self, view: SchedulerView, decision: Decision) -> None:
        gone = [rid for rid in decision.admit
                if (r := self.requests.get(rid)) is None or r.status != RequestStatus.WAITING]
        if gone:  # e.g. aborted by the policy while it decided, on a view from before
            raise InvalidDecision(f"admission names requests that are not waiting: {gone}")
        allotment = view.allot(decision)
        batch_id = self._next_batch_id
        self._next_batch_id += 1
        segments = []
        for w, tokens in allotment:
            req = self.requests[w.request_id]
            self.waiting.remove(req)
            start = req.num_computed
            self.blocks.grow(req, start + tokens)
            self._note_admitted(req)
            req.status = RequestStatus.PREFILLING
            req.batch_id = batch_id
            data = self.with_data
            segments.append(Segment(
                req.request_id, start, tokens, tuple(req.block_table) if data else (),
                sample=start + tokens == req.num_tokens,
                token_ids=tuple(req.tokens(start, start + tokens)) if data else ()))
        g = decision.num_groups
        self.batches.append(
            PrefillBatch(batch_id, g, layer_groups(self.num_layers, g), tuple(segments)))
