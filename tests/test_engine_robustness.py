"""The engine behind live traffic: aborts at any point, policies that misbehave, and bad
input never jam it, lose a request or hold a KV block (found by driving its public API)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine_adapter.config import EngineConfig
from engine_adapter.decision import Decision
from engine_adapter.engine import Engine
from engine_adapter.errors import ConfigError, InvalidDecision, RequestError
from engine_adapter.executor_wrapper import ExecutorWrapper
from engine_adapter.model_config import ModelConfig
from lpenv.backends import BackendConfig, build_executor

TINY = ModelConfig.load("qwen3-moe-tiny")


def sim_engine(decide=None, **settings) -> Engine:
    cfg = EngineConfig(model="qwen3-moe-tiny", **settings)
    executor = build_executor(BackendConfig(name="sim", latency_noise=False), cfg, TINY)
    return Engine(cfg, decide=decide, executor=executor, model_config=TINY)


class Recording(ExecutorWrapper):
    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.plans: list = []

    def execute(self, plan):
        self.plans.append(plan)
        return self.inner.execute(plan)


def recording(e: Engine) -> list:
    """The plans ``e``'s executor is given, as they come."""
    e.executor = Recording(e.executor)
    return e.executor.plans


def tight() -> Engine:
    """16 KV blocks of 4 tokens: A decodes, B's five-stage batch takes the last free ones."""
    e = sim_engine(kv_cache_tokens=64, block_size=4, max_model_len=64)
    e.add_request_of_length(7, 40, request_id="A")
    e.step(Decision(1, ("A",)))
    e.add_request_of_length(56, 1, request_id="B")
    e.step(Decision(5, ("B",)))
    assert e.blocks.num_free == 0
    return e


def test_aborting_a_batch_mid_prefill_frees_it_and_the_engine_goes_on():
    # (its blocks stayed held and A's growth found no one to preempt: every later step
    # raised "request A cannot fit in the KV cache")
    e = tight()
    plans = recording(e)
    e.abort("B")
    assert "B" not in e.scheduler.requests and not e.scheduler.batches  # cancelled at once
    e.run()
    assert plans[0].cancelled_batches == (1,)  # the executor drops its carried activations
    assert not e.has_unfinished() and e.blocks.num_free == e.blocks.num_blocks


def test_a_batch_with_one_request_aborted_is_preempted_whole_when_blocks_run_short():
    e = sim_engine(decide=lambda view: Decision(1, view.fcfs_admission()), kv_cache_tokens=64,
                   block_size=4, max_model_len=64)
    e.add_request_of_length(7, 40, request_id="A")
    e.step(Decision(1, ("A",)))
    e.add_request_of_length(28, 1, request_id="B")
    e.add_request_of_length(28, 2, request_id="C")
    e.step(Decision(5, ("B", "C")))
    assert e.blocks.num_free == 0
    e.abort("B")  # C still wants its tokens: the batch flies on
    assert e.scheduler.batches
    e.run()  # A's growth preempts the batch: B retired, C back in the queue, then served
    assert not e.has_unfinished() and e.blocks.num_free == e.blocks.num_blocks


def test_a_refused_decision_keeps_the_preemption_for_the_next_plan():
    # (prepare preempted B's batch for A's growth; a refused decision then ran prepare again,
    # which forgot both: the torch executor kept B's activations for good)
    for refuse in (False, True):
        e = tight()
        plans = recording(e)
        e.add_request_of_length(4, 1, request_id="C")
        e.decision_view()
        if refuse:
            with pytest.raises(InvalidDecision):
                e.step(Decision(99, ("C",)))
        report = e.step(Decision.wait())
        assert plans[-1].cancelled_batches == (1,) and report.preempted == ["B"]


def test_a_policy_that_aborts_while_deciding_loses_nothing():
    # (it admitted from the view it was given: "a" was started, then KeyError on "b", and
    # "a" was left prefilling in no batch, two blocks held, has_unfinished() False)
    holder = {}

    def decide(view):
        holder["e"].abort("b")  # drops a hopeless request, then admits what it saw
        return Decision(1, view.fcfs_admission())

    e = sim_engine(decide=decide, kv_cache_tokens=1024)
    holder["e"] = e
    e.add_request_of_length(20, 3, request_id="a")
    e.add_request_of_length(20, 3, request_id="b")
    with pytest.raises(InvalidDecision, match=r"not waiting: \['b'\]"):
        e.step()
    assert [r.request_id for r in e.scheduler.waiting] == ["a"]
    assert e.blocks.num_free == e.blocks.num_blocks
    e.scheduler.decide = lambda view: Decision(1, view.fcfs_admission())
    e.run()
    assert e.blocks.num_free == e.blocks.num_blocks


@pytest.mark.parametrize("admit, message", [
    ("ab", "tuple of request ids"),  # a bare string admitted "a" and "b"
    (None, "tuple of request ids"),  # was taken as waiting
])
def test_a_malformed_admission_is_refused(admit, message):
    e = sim_engine(kv_cache_tokens=1024)
    e.add_request_of_length(20, 3, request_id="a")
    e.add_request_of_length(20, 3, request_id="b")
    with pytest.raises(InvalidDecision, match=message):
        e.step(Decision(1, admit))
    assert len(e.scheduler.waiting) == 2 and e.blocks.num_free == e.blocks.num_blocks


def test_an_admission_where_none_is_due_is_refused_not_ignored():
    e = sim_engine(kv_cache_tokens=1024)
    e.add_request_of_length(20, 3, request_id="a")
    e.step(Decision(1, ("a",)))
    with pytest.raises(InvalidDecision, match="no request waits"):
        e.step(Decision(5, ("ghost",)))
    chunked = sim_engine(kv_cache_tokens=1024, mode="chunked", chunk_tokens=16)
    chunked.add_request_of_length(20, 3, request_id="a")
    with pytest.raises(InvalidDecision, match="first come, first served itself"):
        chunked.step(Decision(1, ("a",)))
    chunked.run()  # nothing lost


def test_request_ids_and_arrival_times():
    e = sim_engine(decide=lambda view: Decision(1, view.fcfs_admission()), kv_cache_tokens=1024)
    e.add_request_of_length(10, 2, request_id="1")
    assert [e.add_request_of_length(10, 2) for _ in range(3)] == ["0", "2", "3"]  # not "1"
    for bad in (math.nan, math.inf, "1.5", True):
        with pytest.raises(RequestError, match="arrival_time must be a finite number"):
            e.add_request_of_length(10, 2, arrival_time=bad)
    rid = e.add_request_of_length(np.int64(30), np.int64(4))  # numpy's counts, as Python's
    request = e.scheduler.requests[rid]
    assert type(request.prompt_len) is int and type(request.max_tokens) is int
    e.run()  # (a numpy prompt length crashed the step's stats after its work was applied)
    assert e.blocks.num_free == e.blocks.num_blocks


def test_step_run_and_max_model_len_are_checked():
    e = sim_engine(kv_cache_tokens=1024)
    e.add_request_of_length(10, 5)
    for limit in (0, -1):
        with pytest.raises(ValueError, match="limit must be a positive integer"):
            e.step_run(1.0, limit=limit)
    with pytest.raises(ValueError, match="NaN"):
        e.step_run(math.nan)
    for bad in ("100", True, 100.5, 0):
        with pytest.raises(ConfigError, match="max_model_len must be a positive integer"):
            EngineConfig(model="qwen3-moe-tiny", max_model_len=bad)
