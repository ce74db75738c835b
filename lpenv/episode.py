"""One episode: a workload arriving on the engine's virtual clock, metrics and reward.

The env and the evaluation scripts share this driver: the env stops at each decision point
and hands it to the agent; evaluation passes a policy that decides in place.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np
from mypy_extensions import mypyc_attr

from engine_adapter.decision import Decision, SchedulerView
from engine_adapter.engine import Engine
from engine_adapter.errors import RequestError
from engine_adapter.plan import IterationReport, RunReport
from lpenv.metrics import MetricsRecorder, measured
from lpenv.reward import SLO, RewardAccountant, RewardConfig
from lpenv.workload import RequestSpec

DecisionPoint = Callable[[SchedulerView], bool]


def draw_prompt(rng: np.random.Generator, spec: RequestSpec, vocab: int) -> list[int]:
    """A request's prompt token ids, drawn from the episode's stream, one draw per request in
    arrival order: what every engine serving the workload is given (the real engine here,
    vLLM in ``lpenv-eval``)."""
    return rng.integers(0, vocab, spec.prompt_tokens).tolist()


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # (compiled: copied with the env)
class Episode:
    def __init__(self, engine: Engine, requests: list[RequestSpec], slo: SLO,
                 reward: RewardConfig, rng: np.random.Generator,
                 horizon_s: float | None = None,
                 on_iteration: Callable[[IterationReport | RunReport], None] | None = None,
                 measure_from_s: float = 0.0, fast_forward: bool = True) -> None:
        self.engine = engine
        self.slo = slo
        self.horizon_s = horizon_s
        self.rng = rng
        self.pending: deque[RequestSpec] = deque(requests)
        self.recorder = MetricsRecorder(measure_from_s)  # requests after the warm-up
        planned_tokens = sum(r.prompt_tokens + r.output_tokens for r in requests)
        counted = sum(measured(r.arrival_time, measure_from_s) for r in requests)
        self.rewards = RewardAccountant(reward, slo, self.recorder, counted, planned_tokens)
        self.decisions = 0
        self.closed = False
        self.last_report: IterationReport | RunReport | None = None
        self.on_iteration = on_iteration  # e.g. a progress bar
        # Stretches needing no decision as runs, where the engine can (the simulator): the
        # same iterations, metrics and rewards as one by one (tests/test_runs.py), faster.
        self.fast_forward = fast_forward

    @property
    def now(self) -> float:
        return self.engine.clock.now()

    @property
    def truncated(self) -> bool:
        return self.horizon_s is not None and self.now >= self.horizon_s

    @property
    def finished(self) -> bool:
        return not self.pending and not self.engine.has_unfinished()

    @property
    def over(self) -> bool:
        return self.finished or self.truncated

    def can_wait(self) -> bool:
        """Waiting makes sense while something runs or more requests are to come."""
        s = self.engine.scheduler
        return bool(self.pending or s.decoding or s.batches)

    def _admit_arrivals(self) -> None:
        engine = self.engine
        vocab = engine.model_config.vocab_size
        while self.pending and self.pending[0].arrival_time <= self.now:
            spec = self.pending.popleft()
            try:
                if engine.needs_token_ids:
                    prompt = draw_prompt(self.rng, spec, vocab)
                    engine.add_request(prompt, spec.output_tokens, spec.request_id,
                                       spec.arrival_time)
                else:  # the simulator: the prompt's length is all that matters
                    engine.add_request_of_length(spec.prompt_tokens, spec.output_tokens,
                                                 spec.request_id, spec.arrival_time)
                self.recorder.arrival(spec.request_id, spec.arrival_time, spec.prompt_tokens,
                                      spec.output_tokens)
            except RequestError:
                # Counted, never silently dropped: a rejected request misses its SLO.
                self.recorder.arrival(spec.request_id, spec.arrival_time, spec.prompt_tokens,
                                      spec.output_tokens, rejected=True)
                self.rewards.rejected(spec.request_id)

    def next_decision(self, is_point: DecisionPoint) -> SchedulerView | None:
        """Run the engine until ``is_point(view)`` holds (returns the view) or the episode is
        over (returns None)."""
        while True:
            if self.over:
                return None
            self._admit_arrivals()
            if self.finished:  # the last arrival was rejected (too long): nothing is left
                return None
            view = self.engine.decision_view()
            if view is not None and is_point(view):
                return view
            self.apply(Decision.wait() if view is not None else None)

    def _step_run(self, decision: Decision | None) -> bool:
        """Run the coming iterations that need no decision (the first may take ``decision``)
        up to the next arrival or the horizon in one go, where the engine can; False where it
        cannot (then one ``step`` goes on)."""
        until = self.pending[0].arrival_time if self.pending else float("inf")
        if self.horizon_s is not None:
            until = min(until, self.horizon_s)
        report = self.engine.step_run(until, decision)
        if report is None:
            return False
        self.last_report = report
        self.rewards.iteration_run(report)  # before the recorder: it reads the run's start
        self.recorder.iteration_run(report)
        if self.on_iteration is not None:
            self.on_iteration(report)
        return True

    def apply(self, decision: Decision | None) -> None:
        """One engine iteration with ``decision`` (or a run of them, where the ones after the
        first need none); an idle engine jumps to the next arrival."""
        # (an idle engine runs nothing: no run to try; ``step`` says so and the clock jumps)
        if self.fast_forward and self.engine.has_unfinished() and self._step_run(decision):
            return
        report = self.engine.step(decision)
        if report is None:
            if not self.pending:
                raise RuntimeError(
                    "requests wait, nothing runs and no more will arrive: a policy that waits "
                    "now would wait forever")
            self.engine.clock.advance_to(self.pending[0].arrival_time)
            self.rewards.deadlines(self.now)
            return
        self.last_report = report
        self.recorder.iteration(report)
        self.rewards.iteration(report)
        if self.on_iteration is not None:
            self.on_iteration(report)

    def close(self, settle: bool = True) -> None:
        """The episode ends; ``settle``: the rewards settle the objective (unfinished requests
        miss; ``RewardAccountant.close``), as an evaluation does and the env where the
        episode ends in the task (not where it is cut short)."""
        if not self.closed:
            self.closed = True
            if settle:
                self.rewards.close()

    def run(self, decide: Callable[[SchedulerView], Decision]) -> dict:
        """Play the whole episode with a policy deciding in place; return the summary."""
        while (view := self.next_decision(lambda v: True)) is not None:
            self.decisions += 1
            self.apply(decide(view))
        self.close()
        self.rewards.take()
        return self.summary()

    def summary(self) -> dict:
        s = self.recorder.summary(self.slo.ttft_s, self.slo.tbt_s)
        s["return"] = self.rewards.total
        s["decisions"] = self.decisions
        return s
