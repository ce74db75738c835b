"""The scheduler's shapes: layer groups, stages, chunk composition, staggered batches."""

from __future__ import annotations

import numpy as np
import pytest

from engine_adapter.config import EngineConfig
from engine_adapter.decision import Decision
from engine_adapter.engine import Engine
from engine_adapter.errors import ConfigError, InvalidDecision
from engine_adapter.model_config import ModelConfig
from engine_adapter.scheduler import layer_groups
from policies.fixed import FixedGroups
from policies.paper_rule import paper_groups
from tests.checking_executor import CheckingExecutor

TINY = ModelConfig.load("qwen3-moe-tiny")


def _engine(mode="layered", policy=None, **cfg):
    cfg.setdefault("kv_cache_tokens", 2048)
    executor = CheckingExecutor(TINY.num_layers, 16, TINY.vocab_size)
    engine = Engine(EngineConfig(model="qwen3-moe-tiny", mode=mode, **cfg), decide=policy,
                    executor=executor, model_config=TINY)
    return engine, executor


@pytest.mark.parametrize("num_layers", [1, 5, 24, 48])
def test_layer_groups_are_numpy_array_split(num_layers):
    for g in range(1, num_layers + 1):
        parts = np.array_split(np.arange(num_layers), g)
        assert layer_groups(num_layers, g) == [(int(p[0]), int(p[-1]) + 1) for p in parts]


def test_layered_batch_runs_one_group_per_iteration_and_emits_at_the_last():
    engine, ex = _engine(policy=FixedGroups(3), prefill_budget=4096)
    engine.add_request(list(range(20)), 3, request_id="a")
    reports = [engine.step() for _ in range(3)]
    ranges = [(p.stages[0].layer_start, p.stages[0].layer_end) for p in ex.plans]
    assert ranges == [(0, 2), (2, 4), (4, 5)]  # array_split of 5 layers into 3
    assert [len(r.events) for r in reports] == [0, 0, 1]
    # After the last stage the request decodes through every layer each iteration.
    report = engine.step()
    assert ex.plans[-1].decode[0].request_id == "a" and not ex.plans[-1].stages
    assert report.decode_tokens == 1 and len(report.events) == 1


def test_prompt_longer_than_budget_goes_in_pieces_each_with_its_own_pass():
    engine, ex = _engine(policy=FixedGroups(2), prefill_budget=8)
    engine.add_request(list(range(20)), 1, request_id="a")
    engine.run()
    firsts = [(st.segments[0].start, st.segments[0].length) for p in ex.plans for st in p.stages
              if st.is_first]
    assert firsts == [(0, 8), (8, 8), (16, 4)]
    assert sum(len(p.stages) for p in ex.plans) == 6  # 3 pieces x G = 2 stages


def test_chunked_budget_decode_first_then_continuing_chunk_then_new():
    engine, ex = _engine(mode="chunked", chunk_tokens=10)
    engine.add_request(list(range(4)), 5, request_id="a")
    engine.step()  # a: 4 prompt tokens, first token
    engine.add_request(list(range(30)), 2, request_id="b")
    engine.add_request(list(range(5)), 2, request_id="c")
    for _ in range(4):
        engine.step()
    for plan in ex.plans:
        assert plan.num_decode_tokens + plan.num_prefill_tokens <= 10
        assert all(st.num_groups == 1 for st in plan.stages)
    second = ex.plans[1]
    assert [s.request_id for s in second.decode] == ["a"]
    assert [(s.request_id, s.length) for s in second.stages[0].segments] == [("b", 9)]
    # b continues ahead of c until its prompt is done; c then fills the rest of the budget.
    fourth = ex.plans[4]
    assert [(s.request_id, s.start, s.length) for s in fourth.stages[0].segments] == [
        ("b", 27, 3), ("c", 0, 5)]


def test_staggered_batches_share_an_iteration_in_different_groups():
    engine, ex = _engine(policy=FixedGroups(5, budget=6, staggered=True), prefill_budget=4096)
    for i in range(3):
        engine.add_request(list(range(6)), 2, request_id=f"r{i}")
    engine.run()
    busiest = max(ex.plans, key=lambda p: len(p.stages))
    assert len(busiest.stages) == 3
    spans = [(st.layer_start, st.layer_end) for st in busiest.stages]
    assert len(set(spans)) == 3  # at most one prefill batch per layer group


def test_no_lm_head_on_prefill_rows_before_the_last_stage():
    engine = Engine(EngineConfig(model="qwen3-moe-tiny", kv_cache_tokens=2048),
                    decide=FixedGroups(3))
    rows = []
    original = engine.executor.model.logits
    engine.executor.model.logits = lambda h: rows.append(h.shape[0]) or original(h)
    engine.add_request(list(range(40)), 2)
    engine.run()
    assert rows == [1, 1]  # the first token's row at the last stage, then one decode row


def test_decode_row_routes_to_top_k_experts_and_bytes_add_up():
    engine = Engine(EngineConfig(model="qwen3-moe-tiny", kv_cache_tokens=2048),
                    decide=FixedGroups(1))
    engine.add_request(list(range(40)), 3)
    reports = engine.run()
    decode = reports[-1]
    assert decode.prefill_tokens == 0 and decode.decode_tokens == 1
    cfg = engine.model_config
    for layer, n in enumerate(decode.distinct_experts):
        assert n == (cfg.top_k if cfg.moe_layers[layer] else None)
    expected = cfg.top_k * cfg.num_moe_layers * cfg.expert_bytes(4)
    assert decode.expert_bytes == expected
    assert decode.total_bytes > decode.expert_bytes and decode.flops > 0
    assert decode.energy_j > 0 and decode.energy_source.startswith("modeled")


def test_layered_reads_experts_once_where_chunks_reread_them():
    def expert_bytes(mode, policy, **cfg):
        engine = Engine(EngineConfig(model="qwen3-moe-tiny", mode=mode, kv_cache_tokens=2048,
                                     **cfg), decide=policy)
        engine.add_request(list(range(256)), 1)
        return sum(r.expert_bytes for r in engine.run())

    chunked = expert_bytes("chunked", None, chunk_tokens=16)
    layered = expert_bytes("layered", FixedGroups(5), prefill_budget=256)
    cfg = TINY
    assert layered == cfg.num_moe_layers * cfg.num_experts * cfg.expert_bytes(4)
    assert chunked > 8 * layered


@pytest.mark.parametrize("tokens, g16, g12", [
    (1, 1, 1), (512, 1, 1), (513, 2, 2), (1024, 2, 2), (1025, 4, 4), (2048, 4, 4),
    (2049, 8, 6), (4096, 8, 6), (4097, 16, 12), (8192, 16, 12)])
def test_paper_rule_table(tokens, g16, g12):
    assert paper_groups(tokens, 16, 48) == g16
    assert paper_groups(tokens, 12, 24) == g12


@pytest.mark.parametrize("max_groups", range(1, 17))
def test_paper_rule_never_lowers_g_for_more_tokens(max_groups):
    gs = [paper_groups(t, max_groups, 48) for t in range(1, 9000, 97)]
    assert gs == sorted(gs) and max(gs) == max_groups


def test_phase_describes_the_lifecycle():
    engine, _ = _engine(policy=FixedGroups(2), prefill_budget=8)
    engine.add_request(list(range(12)), 2, request_id="a")
    sched = engine.scheduler
    assert sched.phase("a") == "waiting"
    engine.step()
    assert sched.phase("a") == "prefilling stage 2/2 (batch 0)"
    engine.step()
    assert sched.phase("a") == "waiting (8/12 tokens computed)"
    engine.step()
    engine.step()
    assert sched.phase("a") == "decoding"
    engine.step()
    assert "a" not in sched.requests


def test_at_the_batch_cap_no_decision_is_asked_and_none_can_start():
    asked = []

    def policy(view):
        asked.append(view.iteration)
        return FixedGroups(3, staggered=True).decide(view)

    engine, ex = _engine(policy=policy, prefill_budget=64, max_batches_in_flight=1)
    engine.add_request(list(range(20)), 2, request_id="a")
    engine.step()  # batch of "a" starts: 3 stages
    engine.add_request(list(range(10)), 2, request_id="b")
    assert engine.decision_view() is None  # "b" waits, but no batch can start
    with pytest.raises(InvalidDecision, match="max_batches_in_flight=1"):
        engine.step(Decision(1, ("b",)))
    assert engine.scheduler.phase("b") == "waiting"  # the refused decision changed nothing
    engine.step()
    engine.step()  # a's last stage: now "b" can start
    assert engine.decision_view() is not None
    engine.run()
    assert asked == [0, 3] and [len(p.stages) for p in ex.plans[:4]] == [1, 1, 1, 1]
    with pytest.raises(ConfigError, match="max_batches_in_flight"):
        EngineConfig(max_batches_in_flight=0)
