"""Bad input gets a clear exception naming the problem and changes nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine_adapter.config import EngineConfig
from engine_adapter.cost_model import CostModel
from engine_adapter.decision import Decision
from engine_adapter.engine import Engine
from engine_adapter.errors import ConfigError, InvalidDecision, RequestError, WeightsError
from engine_adapter.executor_sim import SimExecutor
from engine_adapter.model_config import ModelConfig
from engine_adapter.weights import dummy_weights, save_safetensors
from lpenv.episode import Episode
from lpenv.reward import SLO, RewardConfig
from lpenv.workload import RequestSpec
from policies.fixed import FixedGroups

TINY = ModelConfig.load("qwen3-moe-tiny")


@pytest.fixture(scope="module")
def engine():
    return Engine(EngineConfig(model="qwen3-moe-tiny", kv_cache_tokens=2048, max_model_len=256),
                  decide=FixedGroups(2))


@pytest.mark.parametrize("prompt, max_tokens, message", [
    ([], 4, "empty prompt"),
    ([1] * 250, 10, "exceeds the model length"),
    ([1, 2], 0, "max_tokens must be a positive integer"),
    ([1, 2], -3, "max_tokens must be a positive integer"),
    ([1, 2], 1.5, "max_tokens must be a positive integer"),
    ([1, 512], 4, "outside the vocabulary"),
    ([-1, 2], 4, "outside the vocabulary"),
])
def test_bad_requests(engine, prompt, max_tokens, message):
    with pytest.raises(RequestError, match=message):
        engine.add_request(prompt, max_tokens)
    assert not engine.has_unfinished()


def test_duplicate_request_id(engine):
    engine.add_request([1, 2, 3], 1, request_id="dup")
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request([1, 2, 3], 1, request_id="dup")
    engine.run()


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConfigError, match="unknown architecture"):
        ModelConfig.load(tmp_path)


def test_unknown_model_name():
    with pytest.raises(ConfigError, match="neither an embedded model"):
        ModelConfig.load("no-such-model")


def test_kv_cache_too_small():
    with pytest.raises(ConfigError, match="cannot hold even one request"):
        Engine(EngineConfig(model="qwen3-moe-tiny", kv_cache_tokens=100, max_model_len=256))


@pytest.mark.parametrize("field, value", [("mode", "pipelined"), ("block_size", 0),
                                          ("dtype", "int3"), ("chunk_tokens", -1)])
def test_bad_engine_config(field, value):
    with pytest.raises(ConfigError, match=field if field != "dtype" else "dtype"):
        EngineConfig(**{field: value})


def test_layered_mode_needs_a_policy_or_a_decision():
    engine = Engine(EngineConfig(model="qwen3-moe-tiny", mode="layered", kv_cache_tokens=2048))
    engine.add_request([1, 2, 3], 2)
    with pytest.raises(InvalidDecision, match="no policy"):
        engine.step()
    view = engine.decision_view()
    engine.step(Decision(1, view.fcfs_admission()))  # an explicit decision needs no policy
    assert engine.scheduler.decision_view(engine.clock.now()) is None


def _checkpoint(tmp_path, mutate):
    config = ModelConfig.load("qwen3-moe-tiny")
    folder = save_safetensors(config, dummy_weights(config, torch.float32, torch.device("cpu")),
                              tmp_path)
    tensors = load_file(folder / "model.safetensors")
    mutate(tensors)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.pop("model.layers.0.mlp.gate.weight"), "1 missing"),
    (lambda t: t.__setitem__("model.layers.9.extra.weight", torch.zeros(2)), "1 unexpected"),
    (lambda t: t.__setitem__("model.norm.weight", torch.zeros(3)), "has shape"),
])
def test_safetensors_that_do_not_match(tmp_path, mutate, message):
    folder = _checkpoint(tmp_path, mutate)
    with pytest.raises(WeightsError, match=message):
        Engine(EngineConfig(model=str(folder), weights=str(folder), kv_cache_tokens=2048),
               decide=FixedGroups(1))


def test_no_safetensors(tmp_path):
    config = ModelConfig.load("qwen3-moe-tiny")
    (tmp_path / "config.json").write_text(json.dumps(config.hf_config))
    with pytest.raises(WeightsError, match="no \\*.safetensors"):
        Engine(EngineConfig(model=str(tmp_path), weights=str(tmp_path), kv_cache_tokens=2048),
               decide=FixedGroups(1))


# (made when the policy decides: a bad Decision is refused where it is made)
@pytest.mark.parametrize("make, message", [
    (lambda: Decision(0, ("a",)), "num_groups must be an integer"),
    (lambda: Decision(99, ("a",)), "num_groups must be an integer"),
    (lambda: Decision(2.0, ("a",)), "num_groups must be an integer"),
    (lambda: Decision(1, ("a", "a")), "twice"),
    (lambda: Decision(1, ("zzz",)), "not waiting"),
    (lambda: Decision(1, ("a", "b")), "gets no tokens"),
    (lambda: Decision(1, ("a", "b"), budget=4), "budget of 4 tokens"),
    (lambda: Decision(1, ("a",), budget=0), "token budget must be a positive integer"),
    (lambda: Decision(1, ("a",), budget=True), "token budget must be a positive integer"),
    (lambda: "G=2", "must return a Decision"),
])
def test_invalid_policy_decision(make, message):
    engine = Engine(EngineConfig(model="qwen3-moe-tiny", kv_cache_tokens=2048, prefill_budget=8),
                    decide=lambda view: make())
    engine.add_request(list(range(10)), 2, request_id="a")
    engine.add_request(list(range(10)), 2, request_id="b")
    with pytest.raises(InvalidDecision, match=message):
        engine.step()
    # Nothing was lost: both requests still wait, no KV block is held.
    assert [r.request_id for r in engine.scheduler.waiting] == ["a", "b"]
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_admission_beyond_kv_blocks_is_invalid():
    engine = Engine(EngineConfig(model="qwen3-moe-tiny", kv_cache_tokens=256, max_model_len=256,
                                 block_size=16, prefill_budget=4096),
                    decide=lambda view: Decision(1, tuple(w.request_id for w in view.waiting)))
    engine.add_request([1] * 200, 4, request_id="a")
    engine.add_request([1] * 200, 4, request_id="b")
    with pytest.raises(InvalidDecision, match="KV blocks"):
        engine.step()


def test_admission_beyond_max_num_seqs_is_invalid():
    engine = Engine(EngineConfig(model="qwen3-moe-tiny", kv_cache_tokens=2048, max_num_seqs=1),
                    decide=lambda view: Decision(1, tuple(w.request_id for w in view.waiting)))
    engine.add_request([1, 2], 4, request_id="a")
    engine.add_request([1, 2], 4, request_id="b")
    with pytest.raises(InvalidDecision, match="max_num_seqs"):
        engine.step()


def test_abort_unknown_request(engine):
    with pytest.raises(KeyError, match="unknown or finished"):
        engine.abort("nope")


def test_requests_known_by_length_only_on_the_simulator(engine):
    with pytest.raises(RequestError, match="give the prompt's token ids"):
        engine.add_request_of_length(10, 2)  # a real model needs the ids
    sim = Engine(EngineConfig(model="qwen3-moe-tiny", kv_cache_tokens=2048, max_model_len=256),
                 decide=FixedGroups(2), executor=SimExecutor(TINY, CostModel(TINY)),
                 model_config=TINY)
    for length, max_tokens, message in [(0, 4, "prompt_len must be a positive integer"),
                                        (250, 10, "exceeds the model length"),
                                        (5, 0, "max_tokens must be a positive integer")]:
        with pytest.raises(RequestError, match=message):
            sim.add_request_of_length(length, max_tokens)
    assert not sim.has_unfinished()
    sim.add_request_of_length(40, 3, request_id="ok")
    assert len(sim.run()) >= 3 and not sim.has_unfinished()


def test_an_episode_whose_last_arrival_is_rejected_ends():
    # Found by hypothesis (tests/test_runs.py): the episode used to wait for work that would
    # never come once the last request was refused at arrival.
    sim = Engine(EngineConfig(model="qwen3-moe-tiny", kv_cache_tokens=2048, max_model_len=256),
                 executor=SimExecutor(TINY, CostModel(TINY)), model_config=TINY)
    requests = [RequestSpec("a", 0.0, 30, 4), RequestSpec("too-long", 5.0, 300, 4)]
    rng = np.random.default_rng(0)
    episode = Episode(sim, requests, SLO(1.0, 1.0), RewardConfig(), rng)
    summary = episode.run(FixedGroups(2))
    assert summary["requests_finished"] == 1 and summary["requests_rejected"] == 1
    assert summary["slo_attainment"] == 0.5
