"""Device memory: the paper-scale models' weights against their model cards, and the simulator
refusing configurations whose weights and KV cache no real device could hold."""

from __future__ import annotations

import gymnasium as gym
import pytest

import lpenv
from engine_adapter.calibration import base_profile
from engine_adapter.config import EngineConfig
from engine_adapter.device_memory import MEMORY_UTILIZATION, check_fits, kv_tokens_that_fit
from engine_adapter.errors import ConfigError
from engine_adapter.hardware import DATASHEET_PROFILES, HardwareProfile, resolve_profile
from engine_adapter.model_config import ModelConfig
from engine_adapter.traffic import model_weight_bytes
from lpenv.backends import BackendConfig, build_executor


@pytest.mark.parametrize("model,params", [
    # Qwen3-30B-A3B's model card: "Number of Parameters: 30.5B in total".
    ("qwen3-30b-a3b", 30.5e9),
    # OpenAI's gpt-oss model card: gpt-oss-20b has 20.9B parameters (biases and sinks, a few
    # million, are not counted here).
    ("gpt-oss-20b", 20.9e9),
])
def test_the_paper_models_weigh_what_their_model_cards_say(model, params):
    assert model_weight_bytes(ModelConfig.load(model), 1) == pytest.approx(params, rel=0.003)


def _engine(model: str, dtype: str, tokens: int) -> EngineConfig:
    return EngineConfig(model=model, dtype=dtype, kv_cache_tokens=tokens, prefill_budget=8192)


def test_the_papers_machine_holds_the_papers_engine_and_says_how_much_more():
    """conf/engine/paper.yaml on 2 x H100 in BF16 fits; the KV tokens that fit are exactly
    the bound (a block more does not)."""
    mc, tp2 = ModelConfig.load("qwen3-30b-a3b"), resolve_profile("h100-sxm-tp2")
    check_fits(tp2, mc, _engine(mc.name, "bfloat16", 262144))
    fit = kv_tokens_that_fit(tp2, mc, 2)
    room = MEMORY_UTILIZATION * 2 * 80e9 - model_weight_bytes(mc, 2)
    assert fit == int(room // mc.kv_bytes_per_token(2)) and 800_000 < fit < 900_000
    check_fits(tp2, mc, _engine(mc.name, "bfloat16", fit // 16 * 16))
    with pytest.raises(ConfigError, match=f"at most {fit:,}"):
        check_fits(tp2, mc, _engine(mc.name, "bfloat16", fit // 16 * 16 + 16))


def test_weights_that_alone_do_not_fit_ask_for_more_devices():
    mc = ModelConfig.load("qwen3-30b-a3b")
    with pytest.raises(ConfigError, match="weights alone do not fit.*-tpN"):
        check_fits(resolve_profile("h100-sxm"), mc, _engine(mc.name, "float32", 16))
    with pytest.raises(ConfigError, match="122.1 GB of weights"):
        check_fits(resolve_profile("a100-80g"), mc, _engine(mc.name, "float32", 16))


def test_profiles_without_a_device_memory_are_not_checked(tmp_path):
    mc = ModelConfig.load("qwen3-30b-a3b")
    cpu = DATASHEET_PROFILES["cpu-generic"]
    assert cpu.memory_bytes == 0 and kv_tokens_that_fit(cpu, mc, 4) is None
    check_fits(cpu, mc, _engine(mc.name, "float32", 1 << 24))
    # A profile file written before profiles had a device memory reads as unchecked.
    old = resolve_profile("h100-sxm").to_json()
    del old["memory_bytes"]
    assert HardwareProfile.from_json(old).memory_bytes == 0
    # A calibrated GPU profile takes the memory its record measured.
    assert base_profile("x", 1e12, 1e12, cpu, 141e9).memory_bytes == 141e9


def test_the_simulator_refuses_what_does_not_fit_before_it_runs():
    mc = ModelConfig.load("gpt-oss-20b")
    cfg = _engine(mc.name, "bfloat16", 1_500_000)  # 73.7 GB of KV beside 41.8 GB of weights
    with pytest.raises(ConfigError, match="gpt-oss-20b in bfloat16 needs 41.8 GB"):
        build_executor(BackendConfig(name="sim", hardware="h100-sxm"), cfg, mc)
    build_executor(BackendConfig(name="sim", hardware="h100-sxm-tp2"), cfg, mc)
    with pytest.raises(ConfigError, match="at most 614,098"):  # when the env is made
        gym.make(lpenv.ENV_ID, engine={"model": mc.name, "dtype": "bfloat16",
                                       "kv_cache_tokens": 1_500_000},
                 workload={"lengths": "arxiv", "rate": 1.0, "num_requests": 4},
                 backend={"name": "sim", "hardware": "a100-80g"})



def test_the_real_engine_refuses_what_its_device_cannot_hold_before_building_it(monkeypatch):
    """On the torch backend: weights beyond the free memory are a clear error at make, not an
    allocator failure (or the OOM killer) while building 122 GB of float32 weights."""
    import lpenv.backends as backends

    monkeypatch.setattr(backends, "free_memory", lambda device: 8e9)  # an 8 GB machine
    with pytest.raises(ConfigError, match=r"qwen3-30b-a3b in float32 needs 122\.\d GB of "
                                          r"weights.*cpu has 8\.0 GB free.*backend.name=sim"):
        gym.make(lpenv.ENV_ID, engine={"model": "qwen3-30b-a3b", "kv_cache_tokens": 40960},
                 backend={"latency": "modeled"})
    # The tiny model fits; a KV cache that does not is refused with what would fit.
    gym.make(lpenv.ENV_ID, backend={"latency": "modeled"})
    with pytest.raises(ConfigError, match="set engine.kv_cache_tokens to at most"):
        gym.make(lpenv.ENV_ID, engine={"kv_cache_tokens": 10**9}, backend={"latency": "modeled"})


def test_the_backend_is_checked_where_the_config_is_read(monkeypatch):
    import torch

    for routing, message in (("foo", "routing model must be"), ("zipf:-1", "exponent"),
                             ("empirical:/no/such.json", "does not exist")):
        with pytest.raises(ConfigError, match=message):
            gym.make(lpenv.ENV_ID, backend={"name": "sim", "routing": routing})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device"):
        gym.make(lpenv.ENV_ID, engine={"device": "cuda"}, backend={"latency": "modeled"})
