"""Runs (the simulator's fast path: iterations needing no decision, priced and applied at
once) change nothing but speed: an episode with them and the same episode one iteration at a
time agree exactly, to the last bit of every time, joule and reward, and in every KV block."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_adapter.clock import VirtualClock
from engine_adapter.config import EngineConfig
from engine_adapter.cost_model import CostModel
from engine_adapter.engine import Engine
from engine_adapter.executor_sim import SimExecutor
from engine_adapter.executor_wrapper import ExecutorWrapper
from engine_adapter.hardware import resolve_profile
from engine_adapter.model_config import ModelConfig
from engine_adapter.plan import (
    IterationReport,
    IterationRun,
    RunReport,
    Segment,
    StageWork,
    TokenEvent,
)
from engine_adapter.scheduler import layer_groups
from lpenv.episode import Episode
from lpenv.metrics import MetricsRecorder
from lpenv.reward import SLO, RewardAccountant, RewardConfig
from lpenv.workload import WorkloadConfig, generate
from policies.chunked import ChunkedPrefill
from policies.fixed import FixedGroups
from policies.paper_rule import PaperRule

QWEN = ModelConfig.load("qwen3-30b-a3b")
GPTOSS = ModelConfig.load("gpt-oss-20b")
# A calibrated-looking GPU profile: latency noise drawn, so the noise stream must line up too.
NOISY = replace(resolve_profile("h100-sxm-tp2"), latency_noise_sd=0.07)
# The CPU form: no overlap (sums), padded attention (a max over the decode batch).
PADDED = replace(resolve_profile("cpu-generic"), padded_attention=True, latency_noise_sd=0.05)
PAPER_SLO = SLO(10.0, 0.125)


class Seen:
    """What an episode's engine did, watched from outside (the runs it executed, and those
    runs' reports: the tests work alike on the compiled modules, whose methods cannot be
    patched)."""

    def __init__(self) -> None:
        self.runs: list[IterationRun] = []  # given to the executor
        self.reports = 0  # run reports
        self.misses_in_runs = 0  # SLO misses found by a run, inside it
        self.batch_ends_in_runs = 0  # runs a prefill batch ended in


class Watching(ExecutorWrapper):
    def __init__(self, inner, seen: Seen) -> None:
        super().__init__(inner)
        self.seen = seen

    def execute_run(self, run: IterationRun, start: float, until: float):
        self.seen.runs.append(run)
        return self.inner.execute_run(run, start, until)


SEEN: dict[int, Seen] = {}  # by the episode's id


def _episode(mcfg: ModelConfig, profile, workload: WorkloadConfig, fast: bool, policy,
             kv_tokens: int = 1 << 20, horizon_s: float | None = None,
             slo: SLO = PAPER_SLO, seed: int = 11,
             cap: int | None = None) -> tuple[Episode, dict]:
    cfg = EngineConfig(model=mcfg.name, prefill_budget=8192, kv_cache_tokens=kv_tokens,
                       max_num_seqs=256, max_model_len=min(32768, kv_tokens),
                       dtype="bfloat16", max_batches_in_flight=cap, mode=policy.mode,
                       chunk_tokens=getattr(policy, "chunk_tokens", 512))
    seen = Seen()
    executor = Watching(SimExecutor(mcfg, CostModel(mcfg, profile, 2), seed=3), seen)
    engine = Engine(cfg, executor=executor, clock=VirtualClock(), model_config=mcfg)
    rng = np.random.default_rng(seed)
    episode = Episode(engine, generate(workload, rng), slo, RewardConfig(), rng,
                      horizon_s=horizon_s, fast_forward=fast, measure_from_s=workload.warmup_s)
    SEEN[id(episode)] = seen
    missed: set[str] = set()

    def count(report) -> None:  # (after the rewards took the report)
        if isinstance(report, RunReport):
            seen.reports += 1
            # Misses new since the last report whose TTFT deadline fell inside the run, or
            # of its decode rows (not those found between reports, e.g. on an idle jump).
            start, end = report.times[0], report.times[-1]
            seen.misses_in_runs += sum(
                start < episode.recorder.requests[rid].arrival_time + slo.ttft_s <= end
                or rid in report.request_ids for rid in episode.rewards.missed - missed)
            seen.batch_ends_in_runs += bool(report.emitted)
        missed.update(episode.rewards.missed)

    episode.on_iteration = count
    return episode, episode.run(policy)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a.keys() - {"decisions"}:  # how often the policy was asked: see the cap test
        x, y = a[key], b[key]
        if isinstance(x, float) and math.isnan(x):
            assert isinstance(y, float) and math.isnan(y), key
        else:
            assert x == y, (key, x, y)


def _assert_identical(fast: Episode, slow: Episode, sf: dict, ss: dict,
                      require_runs: bool = True) -> None:
    assert SEEN[id(fast)].reports > 0 or not require_runs  # the fast path ran
    assert SEEN[id(slow)].reports == 0  # and only there
    _same(sf, ss)
    assert sf["return"] == ss["return"]
    assert fast.recorder.iteration_latencies == slow.recorder.iteration_latencies
    assert fast.rewards.missed == slow.rewards.missed
    for rid, rec in slow.recorder.requests.items():
        assert fast.recorder.requests[rid].token_times == rec.token_times, rid
    ef, es = fast.engine, slow.engine
    assert ef.clock.now() == es.clock.now()
    assert ef.scheduler.stats == es.scheduler.stats
    assert ef.scheduler.iteration == es.scheduler.iteration
    assert ef.blocks._free == es.blocks._free  # the same blocks, in the same order
    assert ef.executor._rng.bit_generator.state == es.executor._rng.bit_generator.state


CASES = {
    "qwen-arxiv-noisy": (QWEN, NOISY, WorkloadConfig(lengths="arxiv", rate=1.5, num_requests=40,
                                                     max_prompt=16000, max_output=400)),
    "gptoss-sharegpt-windows-sinks": (GPTOSS, NOISY, WorkloadConfig(
        lengths="sharegpt", rate=6.0, num_requests=60, max_output=300)),
    "qwen-padded-cpu-form": (QWEN, PADDED, WorkloadConfig(lengths="sharegpt", rate=4.0,
                                                          num_requests=40, max_output=200)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_runs_change_nothing(case):
    # The paper's rule keeps one batch in flight; with the engine's cap at 1 (as lpenv-eval
    # sets it) runs go on while requests wait, against no cap and no runs at all.
    mcfg, profile, workload = CASES[case]
    fast, sf = _episode(mcfg, profile, workload, True, PaperRule(16), cap=1)
    slow, ss = _episode(mcfg, profile, workload, False, PaperRule(16))
    _assert_identical(fast, slow, sf, ss)
    assert sf["requests_finished"] == workload.num_requests
    uncapped, su = _episode(mcfg, profile, workload, True, PaperRule(16))
    _assert_identical(uncapped, slow, su, ss)
    # The policy is asked only where a batch can start.
    assert sf["decisions"] < su["decisions"] == ss["decisions"]


def _chunk_runs(*episodes: Episode) -> tuple[int, int]:
    """The chunked runs executed (the queue's head prefilled chunk after chunk), and their
    iterations."""
    runs = [r for e in episodes for r in SEEN[id(e)].runs if r.chunk]
    return len(runs), sum(r.max_iterations for r in runs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_runs_in_chunked_mode(case):
    # First come, first served: runs where nothing waits, and while the queue's head is
    # prefilled chunk after chunk (long prompts: the arXiv shape).
    mcfg, profile, _ = CASES[case]
    workload = WorkloadConfig(lengths="arxiv", rate=1.5, num_requests=30, max_prompt=16000,
                              max_output=200)
    fasts = []
    for chunk in (512, 160):  # 160: a budget the decode batch can fill (no chunk at all)
        fast, sf = _episode(mcfg, profile, workload, True, ChunkedPrefill(chunk))
        slow, ss = _episode(mcfg, profile, workload, False, ChunkedPrefill(chunk))
        _assert_identical(fast, slow, sf, ss)
        assert sf["requests_finished"] == 30
        fasts.append(fast)
    runs, iterations = _chunk_runs(*fasts)
    assert runs > 10 and iterations > 5 * runs


def test_chunked_runs_under_kv_pressure_and_a_horizon():
    # Chunks and decode rows growing into a small cache: runs stop where their blocks would
    # not fit, preemption happens one iteration at a time, and the horizon cuts a run.
    fasts = []
    workload = WorkloadConfig(lengths="arxiv", rate=3.0, num_requests=30, max_prompt=6000,
                              max_output=300)
    for horizon in (None, 7.0):
        fast, sf = _episode(QWEN, NOISY, workload, True, ChunkedPrefill(512), kv_tokens=12000,
                            horizon_s=horizon, slo=SLO(2.0, 0.05))
        slow, ss = _episode(QWEN, NOISY, workload, False, ChunkedPrefill(512), kv_tokens=12000,
                            horizon_s=horizon, slo=SLO(2.0, 0.05))
        _assert_identical(fast, slow, sf, ss)
        assert ss["requests_finished"] > 0 and len(slow.rewards.missed) > 0
        fasts.append(fast)
    assert _chunk_runs(*fasts)[0] > 0


def test_runs_under_kv_pressure_and_a_horizon():
    # A cache too small for the load (7 preemptions in the whole run): runs must stop where
    # growth would outrun the free blocks (preemption happens one iteration at a time), and
    # at the horizon.
    workload = WorkloadConfig(lengths="sharegpt", rate=8.0, num_requests=60, max_output=400)
    for horizon in (None, 9.0):
        fast, sf = _episode(QWEN, NOISY, workload, True, FixedGroups(4), kv_tokens=6000,
                            horizon_s=horizon, slo=SLO(2.0, 0.02), cap=1)
        slow, ss = _episode(QWEN, NOISY, workload, False, FixedGroups(4), kv_tokens=6000,
                            horizon_s=horizon, slo=SLO(2.0, 0.02))
        _assert_identical(fast, slow, sf, ss)
        assert ss["requests_finished"] > 0 and 0 < len(slow.rewards.missed) < 60


def _layered_property(mcfg: ModelConfig, profile, rate: float, seed: int, groups: int,
                      staggered: bool, kv: int, slo: SLO, horizon: float | None = None) -> None:
    """Fixed-G episodes on ShareGPT with runs and one by one agree (G 0: every layer its own
    group). Unstaggered, the engine's cap (as lpenv-eval sets it) lets runs pass waiting
    requests. With a horizon an episode may end before any run: the horizon can come before
    the first stretch without decisions."""
    policy = FixedGroups(groups or mcfg.num_layers, staggered=staggered)
    workload = WorkloadConfig(lengths="sharegpt", rate=rate, num_requests=25, max_output=120)
    fast, sf = _episode(mcfg, profile, workload, True, policy, kv_tokens=kv, slo=slo, seed=seed,
                        cap=policy.max_in_flight, horizon_s=horizon)
    slow, ss = _episode(mcfg, profile, workload, False, policy, kv_tokens=kv, slo=slo,
                        seed=seed, horizon_s=horizon)
    _assert_identical(fast, slow, sf, ss, require_runs=horizon is None)


def _chunked_property(mcfg: ModelConfig, profile, rate: float, seed: int, chunk: int, kv: int,
                      slo: SLO, horizon: float | None = None) -> None:
    """Chunked episodes on arXiv with runs and one by one agree."""
    workload = WorkloadConfig(lengths="arxiv", rate=rate, num_requests=12, max_prompt=7000,
                              max_output=80)
    fast, sf = _episode(mcfg, profile, workload, True, ChunkedPrefill(chunk), kv_tokens=kv,
                        slo=slo, seed=seed, horizon_s=horizon)
    slow, ss = _episode(mcfg, profile, workload, False, ChunkedPrefill(chunk), kv_tokens=kv,
                        slo=slo, seed=seed, horizon_s=horizon)
    _assert_identical(fast, slow, sf, ss, require_runs=horizon is None)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rate=st.floats(0.5, 12.0), seed=st.integers(0, 2**16), groups=st.sampled_from([1, 3, 8]),
       staggered=st.booleans(), kv=st.sampled_from([4096, 20000, 1 << 20]),
       slo=st.sampled_from([SLO(3.0, 0.03), SLO(0.5, 0.125)]))
def test_runs_equal_single_steps_on_any_workload(rate, seed, groups, staggered, kv, slo):
    _layered_property(QWEN, NOISY, rate, seed, groups, staggered, kv, slo)


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(sorted(CASES)), rate=st.floats(0.5, 12.0),
       seed=st.integers(0, 2**16), groups=st.sampled_from([1, 2, 3, 8, 0]),
       staggered=st.booleans(), kv=st.sampled_from([3000, 4096, 20000, 1 << 20]),
       horizon=st.sampled_from([None, 5.0, 13.0]),
       slo=st.sampled_from([SLO(3.0, 0.03), SLO(0.5, 0.125), PAPER_SLO]))
def test_runs_equal_single_steps_long(case, rate, seed, groups, staggered, kv, horizon, slo):
    """The property above, longer (``make test-slow``): both models, CPU and GPU pricing, G up
    to every layer its own group, caches from a few thousand tokens (long prompts rejected,
    preemption) to a million, and horizons that cut episodes."""
    mcfg, profile, _ = CASES[case]
    _layered_property(mcfg, profile, rate, seed, groups, staggered, kv, slo, horizon)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rate=st.floats(0.5, 6.0), seed=st.integers(0, 2**16),
       chunk=st.sampled_from([64, 256, 512]), kv=st.sampled_from([8192, 30000, 1 << 20]),
       slo=st.sampled_from([SLO(3.0, 0.03), SLO(0.5, 0.125)]))
def test_chunked_runs_equal_single_steps_on_any_workload(rate, seed, chunk, kv, slo):
    _chunked_property(QWEN, NOISY, rate, seed, chunk, kv, slo)


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(sorted(CASES)), rate=st.floats(0.5, 6.0),
       seed=st.integers(0, 2**16), chunk=st.sampled_from([64, 256, 512, 2048]),
       kv=st.sampled_from([8192, 30000, 1 << 20]), horizon=st.sampled_from([None, 6.0]),
       slo=st.sampled_from([SLO(3.0, 0.03), SLO(0.5, 0.125)]))
def test_chunked_runs_equal_single_steps_long(case, rate, seed, chunk, kv, horizon, slo):
    """The chunked property, longer (``make test-slow``)."""
    mcfg, profile, _ = CASES[case]
    _chunked_property(mcfg, profile, rate, seed, chunk, kv, slo, horizon)


@pytest.mark.parametrize("mcfg,profile", [(QWEN, "h100-sxm-tp2"), (GPTOSS, "a100-80g"),
                                          (QWEN, PADDED)])
@pytest.mark.parametrize("rows,batch", [(9, None), (9, (1, 48)), (0, (1, 48)), (1, None),
                                        (7, (0, 5)), (0, (0, 3)), (5, (0, 2))])
def test_a_run_prices_each_iteration_as_alone(mcfg, profile, rows, batch):
    cost = CostModel(mcfg, profile, 2)
    rng = np.random.default_rng(rows)
    starts = rng.integers(0, 3000, rows).tolist()
    decode = tuple(Segment(f"r{j}", s, 1, (), True) for j, s in enumerate(starts))
    stages, bounds, k = (), (), 40
    if batch:  # (first stage, G) of a batch of two pieces: from its first or a later stage
        # to its last; 48 groups are 1-layer stages, leaving some layer kinds uncovered
        stage, groups = batch
        bounds = layer_groups(mcfg.num_layers, groups)
        segs = (Segment("p0", 0, 700, (), True), Segment("p1", 1200, 300, (), False))
        stages, k = (StageWork(9, stage, groups, *bounds[stage], segs),), groups - stage
    run = IterationRun(7, "layered", mcfg.num_layers, decode, stages, bounds, k)
    _prices_each_iteration_as_alone(mcfg, cost, run)


@pytest.mark.parametrize("mcfg,profile", [(QWEN, "h100-sxm-tp2"), (GPTOSS, "a100-80g"),
                                          (QWEN, PADDED)])
@pytest.mark.parametrize("rows,batch", [(9, (0, 1)), (0, (0, 1)), (4, (1, 3)), (3, (47, 48))])
def test_a_run_past_its_batch_prices_each_iteration_as_alone(mcfg, profile, rows, batch):
    # The batch's requests join the decode rows after its last stage: from its first stage
    # (G = 1: that is iteration 0) or a later one, with or without other decode rows.
    rng = np.random.default_rng(rows)
    decode = tuple(Segment(f"r{j}", s, 1, (), True)
                   for j, s in enumerate(rng.integers(0, 3000, rows).tolist()))
    stage, groups = batch
    bounds = layer_groups(mcfg.num_layers, groups)
    segs = (Segment("p0", 0, 700, (), True), Segment("p1", 1200, 300, (), True))
    joined = tuple(Segment(s.request_id, s.end, 1, (), True) for s in segs)
    run = IterationRun(7, "layered", mcfg.num_layers, decode,
                       (StageWork(9, stage, groups, *bounds[stage], segs),), bounds,
                       groups - stage + 30, joined=joined)
    end = run.batch_end
    assert end == groups - 1 - stage
    assert run.plan(end).stages and not run.plan(end + 1).stages
    assert [s.start for s in run.plan(end + 3).decode[-2:]] == [702, 1502]
    assert run.iteration_tokens(end + 3) == [rows + 1000] * (end + 1) + [rows + 2] * 2
    _prices_each_iteration_as_alone(mcfg, CostModel(mcfg, profile, 2), run)


@pytest.mark.parametrize("cut", [1, 2, 3, 4, 9])
def test_a_noisy_run_past_its_batch_cut_anywhere_draws_as_one_by_one(cut):
    # A G = 4 batch (iterations 0-3) joined by its requests' decode, on a profile with latency
    # noise, cut by a deadline inside the batch, at its end, or after it: the iterations that
    # ran take the noise draws one by one would, and the stream is left where one by one
    # would leave it (the next run draws on from there).
    bounds = layer_groups(QWEN.num_layers, 4)
    segs = (Segment("p0", 0, 700, (), True),)
    run = IterationRun(7, "layered", QWEN.num_layers, (Segment("d", 900, 1, (), True),),
                       (StageWork(9, 0, 4, *bounds[0], segs),), tuple(bounds), 12,
                       joined=(Segment("p0", 700, 1, (), True),))
    cost = CostModel(QWEN, NOISY, 2)
    fast, slow = SimExecutor(QWEN, cost, seed=5), SimExecutor(QWEN, cost, seed=5)
    ends = [5.0]
    for i in range(12):
        ends.append(ends[-1] + slow.execute(run.plan(i)).latency_s)
    result = fast.execute_run(run, 5.0, ends[cut - 1] + 1e-9)  # ``cut`` iterations start before
    assert result.iterations == cut
    assert result.times == pytest.approx(ends[:cut + 1], rel=1e-12)
    after = SimExecutor(QWEN, cost, seed=5)
    for i in range(cut):  # one by one, the same iterations
        after.execute(run.plan(i))
    assert fast._rng.standard_normal() == after._rng.standard_normal()
    for i, (x, m, f) in enumerate(zip(result.expert_bytes, result.moved_bytes, result.flops)):
        t = slow.execute(run.plan(i)).traffic
        assert (x, m, f) == (t.expert_bytes, t.weight_bytes + t.kv_bytes, t.flops)


def test_runs_go_on_past_a_batch_where_nothing_waits():
    # G = 1 (the batch ends in the run's first iteration) and G = 8: its requests decode in
    # the same run; KV pressure stops such runs where the joined rows' blocks run out.
    joined = 0
    workload = WorkloadConfig(lengths="sharegpt", rate=3.0, num_requests=40, max_output=200)
    for groups, kv in ((1, 1 << 20), (8, 1 << 20), (1, 5000)):
        fast, sf = _episode(QWEN, NOISY, workload, True, FixedGroups(groups), kv_tokens=kv,
                            slo=SLO(1.0, 0.05))
        slow, ss = _episode(QWEN, NOISY, workload, False, FixedGroups(groups), kv_tokens=kv,
                            slo=SLO(1.0, 0.05))
        _assert_identical(fast, slow, sf, ss)
        joined += sum(bool(r.joined) and r.max_iterations > r.join_at
                      for r in SEEN[id(fast)].runs)
    assert joined > 20


@pytest.mark.parametrize("emitted_at", [0, 1, 3])
def test_a_run_past_its_batch_is_paid_as_one_iteration_after_the_other(emitted_at):
    # Request "d" decodes throughout; "b" (arrived at 0.3) gets its first token as its batch
    # ends (iteration ``emitted_at``), then one per iteration. Against a TBT SLO of 0.05 s
    # only the gap ending iteration 1 is late, and "w" waits throughout (its TTFT runs out in
    # the run).
    times = [1.0, 1.02, 1.10, 1.12, 1.14, 1.15]
    n = len(times) - 1

    def accountant():
        recorder = MetricsRecorder()
        recorder.arrival("d", 0.0, 10, 50)
        recorder.requests["d"].token_times += [0.5, 0.99]
        recorder.arrival("b", 0.3, 10, 50)
        recorder.arrival("w", 0.1, 10, 50)
        return recorder, RewardAccountant(RewardConfig(), SLO(1.0, 0.05), recorder, 3, 180)

    recorder, rewards = accountant()
    report = RunReport(0, n, times, np.diff(times).tolist(), ("d",), (2,), [0.25] * n, 0, 0, 0,
                       "modeled", emitted=(("b", 0),), emitted_at=emitted_at)
    rewards.iteration_run(report)
    recorder.iteration_run(report)

    one_recorder, one_rewards = accountant()
    for i in range(n):
        events = [TokenEvent("d", 2 + i, 0, times[i + 1])]
        if i >= emitted_at:
            events.append(TokenEvent("b", i - emitted_at, 0, times[i + 1]))
        single = IterationReport(i, "layered", times[i], times[i + 1] - times[i], 1, 0, [],
                                 [], 0, 0, 0, 0, 0.25, "modeled", events)
        one_rewards.iteration(single)
        one_recorder.iteration(single)
    assert rewards.missed == one_rewards.missed and "w" in rewards.missed
    assert ("b" in rewards.missed) == (emitted_at == 0)
    assert rewards.take() == one_rewards.take()
    for rid in ("d", "b", "w"):
        assert recorder.requests[rid].token_times == one_recorder.requests[rid].token_times


@pytest.mark.parametrize("mcfg,profile", [(QWEN, "h100-sxm-tp2"), (GPTOSS, "a100-80g"),
                                          (QWEN, PADDED)])
@pytest.mark.parametrize("rows,start,chunk", [(9, 0, 400), (0, 0, 512), (3, 700, 100),
                                              (1, 126, 512), (0, 5000, 64)])
def test_a_chunked_run_prices_each_iteration_as_alone(mcfg, profile, rows, start, chunk):
    # From a prompt's first chunk (SDPA's causal path on the CPU) or a later one, past
    # GPT-OSS's 128-token window, with and without decode rows beside it.
    rng = np.random.default_rng(rows)
    decode = tuple(Segment(f"r{j}", s, 1, (), True)
                   for j, s in enumerate(rng.integers(0, 3000, rows).tolist()))
    stage = StageWork(9, 0, 1, 0, mcfg.num_layers, (Segment("p", start, chunk, (), False, ()),))
    run = IterationRun(7, "chunked", mcfg.num_layers, decode, (stage,),
                       ((0, mcfg.num_layers),), 30, chunk)
    assert run.plan(4).stages[0].segments[0].start == start + 4 * chunk
    assert run.plan(4).stages[0].batch_id == 13
    _prices_each_iteration_as_alone(mcfg, CostModel(mcfg, profile, 2), run)


def _prices_each_iteration_as_alone(mcfg: ModelConfig, cost: CostModel,
                                    run: IterationRun) -> None:
    k = run.max_iterations
    executor = SimExecutor(mcfg, cost, noise=False)
    result = executor.execute_run(run, 5.0, float("inf"))
    assert result.iterations == k
    for i in range(k):
        alone = executor.execute(run.plan(i))
        assert result.times[i + 1] - result.times[i] == pytest.approx(alone.latency_s, rel=1e-12)
        t = alone.traffic
        assert result.expert_bytes[i] == t.expert_bytes
        assert result.moved_bytes[i] == t.weight_bytes + t.kv_bytes
        assert result.flops[i] == t.flops
    # Cut at a deadline: only the iterations starting before it.
    until = float(result.times[k // 2]) + 1e-9
    assert executor.execute_run(run, 5.0, until).iterations == k // 2 + 1


def test_runs_with_requests_running_out_of_time_inside_them():
    # Tight TTFT (0.3 s), requests waiting behind a batch in flight: misses fall inside runs, at the
    # iteration one by one would find them, and batches end inside runs too.
    misses = batch_ends = 0
    workload = WorkloadConfig(lengths="sharegpt", rate=8.0, num_requests=40, max_output=120)
    for groups in (3, 8):
        fast, sf = _episode(QWEN, NOISY, workload, True, FixedGroups(groups),
                            slo=SLO(0.3, 0.125), cap=1)
        slow, ss = _episode(QWEN, NOISY, workload, False, FixedGroups(groups),
                            slo=SLO(0.3, 0.125))
        _assert_identical(fast, slow, sf, ss)
        misses += SEEN[id(fast)].misses_in_runs
        batch_ends += SEEN[id(fast)].batch_ends_in_runs
    assert misses > 0 and batch_ends > 0
