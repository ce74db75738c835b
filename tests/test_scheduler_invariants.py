"""Scheduler invariants over random workloads and random policy decisions (hypothesis).

* every admitted request that is not aborted finishes with exactly its requested tokens;
* no KV block leaks or is shared, and every row finds its own KV (CheckingExecutor);
* every request decoding at the start of an iteration emits a token in it unless preempted
  (decode never stalls, in layered mode too);
* greedy outputs do not depend on the schedule (real model, against solo runs).
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_adapter.config import EngineConfig
from engine_adapter.decision import Decision, SchedulerView, WaitingRequest
from engine_adapter.engine import Engine
from engine_adapter.errors import InvalidDecision
from engine_adapter.model_config import ModelConfig
from engine_adapter.request import RequestStatus
from tests.checking_executor import CheckingExecutor, token_for

TINY = ModelConfig.load("qwen3-moe-tiny")
MAX_LEN = 64


class RandomDecisions:
    """Random G, random admitted subsets in random order, random waits (at most 3 in a row)."""

    def __init__(self, seed: int, stagger: bool) -> None:
        self.rng = random.Random(seed)
        self.stagger = stagger
        self.waits = 0

    def __call__(self, view: SchedulerView) -> Decision:
        if (view.in_flight and not self.stagger) or (self.waits < 3 and self.rng.random() < 0.3):
            self.waits += 1
            return Decision.wait()
        g = self.rng.randint(1, view.num_layers)
        ids = [w.request_id for w in view.waiting]
        self.rng.shuffle(ids)
        admit = tuple(ids[: self.rng.randint(1, len(ids))])
        try:
            view.allot(Decision(g, admit))
        except InvalidDecision:
            admit = view.fcfs_admission()
        self.waits = 0
        return Decision(g, admit) if admit else Decision.wait()


workloads = st.lists(
    st.tuples(st.integers(1, 40), st.integers(1, 12), st.integers(0, 12)),  # prompt, max, step
    min_size=1, max_size=8)


def _drive(engine: Engine, workload, abort_at: dict[int, int], vocab: int,
           preempted: set[str] | None = None):
    """Run to completion, adding requests at their step; check invariants on every step."""
    total = engine.blocks.num_blocks
    gen = random.Random(0)
    pending = sorted(enumerate(workload), key=lambda x: x[1][2])
    prompts, emitted, aborted = {}, {}, set()
    step = idle = 0
    while pending or engine.has_unfinished():
        while pending and pending[0][1][2] <= step:
            i, (plen, max_tokens, _) = pending.pop(0)
            prompt = [gen.randrange(vocab) for _ in range(plen)]
            rid = engine.add_request(prompt, max_tokens, request_id=f"r{i}")
            prompts[rid], emitted[rid] = (prompt, max_tokens), []
        if step in abort_at:
            live = sorted(engine.scheduler.requests)
            if live:
                victim = live[abort_at[step] % len(live)]
                engine.abort(victim)
                aborted.add(victim)
        decoding = {r.request_id for r in engine.scheduler.decoding}
        report = engine.step()
        step += 1
        if report is None:
            idle = 0 if pending else idle + 1  # a policy may wait, but not forever
            assert idle < 10, "requests wait but nothing is scheduled"
            continue
        idle = 0
        if preempted is not None:
            preempted.update(report.preempted)
        emitters = {ev.request_id for ev in report.events}
        missed = decoding - set(report.preempted) - emitters
        assert not missed, f"decoding requests {missed} missed an iteration"
        for ev in report.events:
            assert ev.request_id not in aborted
            assert ev.index == len(emitted[ev.request_id])
            emitted[ev.request_id].append(ev.token_id)
        held = [b for r in engine.scheduler.requests.values() for b in r.block_table]
        assert len(held) == len(set(held)), "a KV block is shared"
        assert len(held) + engine.blocks.num_free == total, "a KV block leaked"
        assert step < 5000, "no progress"
    assert engine.blocks.num_free == total
    return prompts, emitted, aborted


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload=workloads, mode=st.sampled_from(["layered", "chunked"]),
       kv_tokens=st.integers(MAX_LEN, 160), block_size=st.sampled_from([1, 4, 16]),
       chunk=st.integers(1, 48), budget=st.integers(1, 64), seed=st.integers(0, 2**16),
       stagger=st.booleans(),
       aborts=st.dictionaries(st.integers(0, 30), st.integers(0, 7), max_size=2))
def test_invariants_random_workloads(workload, mode, kv_tokens, block_size, chunk, budget, seed,
                                     stagger, aborts):
    workload = [(p, m, s) for p, m, s in workload if p + m <= MAX_LEN]
    cfg = EngineConfig(model="qwen3-moe-tiny", mode=mode, kv_cache_tokens=kv_tokens,
                       block_size=block_size, chunk_tokens=chunk, prefill_budget=budget,
                       max_model_len=MAX_LEN, max_num_seqs=6)
    executor = CheckingExecutor(TINY.num_layers, block_size, TINY.vocab_size)
    engine = Engine(cfg, decide=RandomDecisions(seed, stagger), executor=executor,
                    model_config=TINY)
    prompts, emitted, aborted = _drive(engine, workload, aborts, TINY.vocab_size)
    for rid, (prompt, max_tokens) in prompts.items():
        if rid in aborted:
            assert len(emitted[rid]) < max_tokens or rid not in engine.scheduler.requests
            continue
        assert len(emitted[rid]) == max_tokens, f"{rid} finished with {len(emitted[rid])} tokens"
        expected = [token_for(rid, len(prompt) + i, TINY.vocab_size) for i in range(max_tokens)]
        assert emitted[rid] == expected


def test_preemption_recomputes_and_finishes():
    """A cache that fits one request at a time forces preemption; nothing is lost."""
    cfg = EngineConfig(model="qwen3-moe-tiny", mode="layered", kv_cache_tokens=MAX_LEN,
                       block_size=4, prefill_budget=64, max_model_len=MAX_LEN)
    executor = CheckingExecutor(TINY.num_layers, 4, TINY.vocab_size)
    engine = Engine(cfg, decide=RandomDecisions(0, stagger=True), executor=executor,
                    model_config=TINY)
    workload = [(30, 20, 0), (30, 20, 0), (20, 30, 1)]
    preempted: set[str] = set()
    prompts, emitted, _ = _drive(engine, workload, {}, TINY.vocab_size, preempted)
    assert all(len(emitted[r]) == m for r, (_, m) in prompts.items())
    assert preempted, "the cache fits one request: someone must have been preempted"


@settings(max_examples=25, deadline=None, derandomize=True)
@given(workload=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 10), st.integers(0, 6)),
                         min_size=2, max_size=5),
       mode=st.sampled_from(["layered", "chunked"]), seed=st.integers(0, 1000),
       kv_tokens=st.integers(MAX_LEN, 128))
def test_real_model_outputs_do_not_depend_on_schedule(workload, mode, seed, kv_tokens):
    cfg = EngineConfig(model="qwen3-moe-tiny", mode=mode, kv_cache_tokens=kv_tokens,
                       block_size=4, chunk_tokens=16, prefill_budget=24, max_model_len=MAX_LEN)
    engine = Engine(cfg, decide=RandomDecisions(seed, stagger=True))
    prompts, emitted, _ = _drive(engine, workload, {}, TINY.vocab_size)
    solo = Engine(EngineConfig(model="qwen3-moe-tiny", mode="chunked", chunk_tokens=4096,
                               kv_cache_tokens=256, max_model_len=MAX_LEN))
    for rid, (prompt, max_tokens) in prompts.items():
        solo.add_request(prompt, max_tokens, request_id=rid)
    alone = {}
    for report in solo.run():
        for ev in report.events:
            alone.setdefault(ev.request_id, []).append(ev.token_id)
    assert emitted == alone


def test_statuses_after_run():
    engine = Engine(EngineConfig(model="qwen3-moe-tiny", mode="chunked", chunk_tokens=8,
                                 kv_cache_tokens=256, max_model_len=MAX_LEN),
                    executor=CheckingExecutor(TINY.num_layers, 16, TINY.vocab_size),
                    model_config=TINY)
    rid = engine.add_request([1, 2, 3], 2)
    req = engine.scheduler.requests[rid]
    engine.run()
    assert req.status == RequestStatus.FINISHED and not req.block_table
    assert torch.tensor(req.output_token_ids).numel() == 2


@settings(max_examples=200, deadline=None)
@given(waiting=st.lists(st.tuples(st.integers(1, 3000), st.integers(0, 2000), st.integers(0, 40)),
                        max_size=4),
       free=st.integers(0, 300), running=st.integers(0, 8), max_seqs=st.integers(1, 8),
       budget=st.integers(-5, 5000), block_size=st.sampled_from([1, 16]))
def test_admits_any_is_whether_fcfs_admits(waiting, free, running, max_seqs, budget,
                                           block_size):
    # The env's masks ask admits_any for each level; it must agree with the admission itself.
    view = SchedulerView(
        now=0.0, iteration=0, mode="layered", num_layers=4, prefill_budget=4096,
        block_size=block_size, free_blocks=free, max_num_seqs=max_seqs, num_running=running,
        num_blocks=1000,
        waiting=tuple(WaitingRequest(f"r{i}", 0.0, left + done, done, left, held)
                      for i, (left, done, held) in enumerate(waiting)),
        decode_context_lens=(), in_flight=())
    assert view.admits_any(budget) == bool(view.fcfs_admission(budget))


def test_a_new_request_is_admitted_only_with_room_for_its_whole_prompt():
    # vLLM's admission: the first 64-token piece of a 200-token prompt would fit 4 free
    # blocks of 16, the whole prompt (13 blocks) would not. It waits rather than start, to be
    # preempted when its later pieces find no room (tests/test_vllm.py: vLLM's schedules).
    def view(free: int, held: int = 0, done: int = 0) -> SchedulerView:
        return SchedulerView(
            now=0.0, iteration=0, mode="chunked", num_layers=4, prefill_budget=64,
            block_size=16, free_blocks=free, max_num_seqs=8, num_running=1, num_blocks=100,
            waiting=(WaitingRequest("a", 0.0, 200, done, 200 - done, held),),
            decode_context_lens=(), in_flight=())

    assert view(12).fcfs_admission() == () and not view(12).admits_any()
    with pytest.raises(InvalidDecision, match="whole prompt must fit"):
        view(12).allot(Decision(1, ("a",)))
    assert view(13).fcfs_admission() == ("a",) and view(13).admits_any()
    assert view(13).allot(Decision(1, ("a",)))[0][1] == 64
    # Holding its first piece's blocks, it takes the next piece where that piece fits.
    assert view(4, held=4, done=64).fcfs_admission() == ("a",)
