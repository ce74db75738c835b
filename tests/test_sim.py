"""The simulator backend: the same scheduler as the real engine, priced instead of run."""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch

import lpenv
from engine_adapter.config import EngineConfig
from engine_adapter.cost_model import CostModel
from engine_adapter.decision import Decision
from engine_adapter.engine import Engine
from engine_adapter.executor_sim import SimExecutor
from engine_adapter.model_config import ModelConfig
from engine_adapter.routing import RoutingModel
from policies.fixed import FixedGroups
from tests.sim_episode import play_trivially

TINY = ModelConfig.load("qwen3-moe-tiny")


class Recorder:
    """Wraps an executor and keeps the schedule of every plan it runs."""

    def __init__(self, inner) -> None:
        self.inner, self.device, self.keys = inner, inner.device, []

    def execute(self, plan):
        self.keys.append(plan.schedule_key())
        return self.inner.execute(plan)


def _drive(engine: Engine, decide, arrivals: dict[int, list[tuple[int, int]]]) -> None:
    gen = torch.Generator().manual_seed(0)
    step = 0
    while step <= max(arrivals) or engine.has_unfinished():
        for i, (plen, out) in enumerate(arrivals.get(step, [])):
            engine.add_request(torch.randint(0, TINY.vocab_size, (plen,), generator=gen).tolist(),
                               out, request_id=f"s{step}-{i}")
        view = engine.decision_view()
        engine.step(decide(view) if view is not None else None)
        step += 1


@pytest.mark.parametrize("mode", ["layered", "chunked"])
def test_torch_and_sim_run_identical_schedules(mode):
    # Small KV cache (preemption), prompts longer than the budget (pieces), staggered batches.
    cfg = EngineConfig(model="qwen3-moe-tiny", mode=mode, kv_cache_tokens=320, block_size=8,
                       prefill_budget=48, chunk_tokens=32, max_model_len=160)
    arrivals = {0: [(70, 12), (20, 30)], 1: [(90, 8)], 3: [(5, 40), (33, 3)], 9: [(120, 20)]}
    policy = FixedGroups(3, budget=40, staggered=True)
    decisions: dict[int, Decision] = {}

    def record(view):
        decisions[view.iteration] = policy.decide(view)
        return decisions[view.iteration]

    real = Engine(cfg, decide=policy, model_config=TINY)
    real.executor = Recorder(real.executor)
    _drive(real, record, arrivals)

    sim = Engine(cfg, executor=Recorder(SimExecutor(TINY, CostModel(TINY))), model_config=TINY)
    _drive(sim, lambda view: decisions[view.iteration], arrivals)
    assert real.executor.keys == sim.executor.keys
    assert len(real.executor.keys) > 20
    if mode == "layered":
        assert any(len(stages) > 1 for _, stages in real.executor.keys)  # staggered
    assert real.blocks.num_free == sim.blocks.num_free == real.blocks.num_blocks


def test_routing_models():
    cfg = ModelConfig.load("qwen3-moe-cpu")  # 64 experts, top-8
    uniform, skewed = RoutingModel(cfg, "uniform"), RoutingModel(cfg, "zipf:1.2")
    assert uniform.distinct(1) == cfg.top_k
    assert uniform.distinct(512) == cfg.num_experts
    assert skewed.distinct(64) < uniform.distinct(64)
    assert [uniform.distinct(r) for r in (1, 4, 16, 64)] == sorted(
        uniform.distinct(r) for r in (1, 4, 16, 64))
    with pytest.raises(ValueError, match="routing model"):
        RoutingModel(cfg, "pareto")


def test_env_on_the_sim_backend():
    from gymnasium.utils.env_checker import check_env

    env = gym.make(lpenv.ENV_ID, engine={"model": "qwen3-30b-a3b", "prefill_budget": 8192,
                                         "dtype": "bfloat16", "kv_cache_tokens": 100_000},
                   workload={"lengths": "arxiv", "rate": 1.5, "num_requests": 20},
                   slo={"ttft_s": 10.0, "tbt_s": 0.125},
                   backend={"name": "sim", "hardware": "h100-sxm"})
    check_env(env.unwrapped, skip_render_check=True)
    s = play_trivially(env, seed=0)["summary"]
    assert s["requests_finished"] + s["requests_rejected"] == 20
    assert s["energy_source"] == "modeled:h100-sxm" and s["expert_bytes"] > 0


@pytest.mark.parametrize("arg,value", [("--repeats", "0"), ("--env-steps", "0"),
                                       ("--seconds", "0"), ("--warmup", "-1")])
def test_bench_sim_refuses_what_it_cannot_measure(tmp_path, capsys, arg, value):
    from scripts.bench_sim import main

    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "sim.json"), arg, value])
    assert exc.value.code == 2 and arg in capsys.readouterr().err


def test_bench_sim_writes_its_fields(tmp_path):
    import json

    from scripts.bench_sim import main

    out = tmp_path / "sim.json"
    main(["--out", str(out), "--seconds", "10", "--warmup", "2", "--env-steps", "30",
          "--repeats", "2"])
    result = json.loads(out.read_text())
    for key in ("realtime_factor", "env_steps_per_s", "wall_s", "simulated_s"):
        assert result[key] > 0, key
    assert len(result["realtime_factor_runs"]) == 2 and len(result["env_steps_per_s_runs"]) == 2
    assert result["random_policy"]["env_random_steps_per_s"] > 0
    assert result["random_policy"]["env_steps"] == 30
    assert result["one_by_one"]["identical"]  # runs change the speed, not the result
    chunked = result["chunked_512"]
    assert chunked["realtime_factor"] > 0 and chunked["one_by_one"]["identical"]


def test_gpt_oss_windows_sinks_and_sim_only():
    """GPT-OSS-20B: sliding window 128 on even layers, sinks, priced by the simulator only."""
    from engine_adapter.engine import build_model
    from engine_adapter.errors import ConfigError
    from engine_adapter.plan import IterationPlan, Segment, StageWork
    from engine_adapter.traffic import _attended_keys, layer_row_stats

    cfg = ModelConfig.load("gpt-oss-20b")
    assert (cfg.num_layers, cfg.num_experts, cfg.top_k) == (24, 32, 4)
    assert [cfg.window(i) for i in range(4)] == [128, None, 128, None]
    with pytest.raises(ConfigError, match="sim backend only"):
        build_model(EngineConfig(model="gpt-oss-20b"), cfg)
    for start, length, window in [(0, 300, 128), (100, 50, 128), (500, 1, 128), (0, 5, 7)]:
        seg = Segment("r", start, length, (), False)
        brute = sum(min(p, window) for p in range(start + 1, start + length + 1))
        assert _attended_keys(seg, window, sinks=False)[0] == brute
        assert _attended_keys(seg, window, sinks=True)[0] == brute + length
    plan = IterationPlan(0, "layered", 24, (Segment("d", 4000, 1, (), True),),
                         (StageWork(0, 0, 1, 0, 24, (Segment("p", 0, 2048, (), True),)),))
    stats = layer_row_stats(plan, cfg)
    assert stats[0].scores < stats[1].scores  # windowed layers attend to far fewer keys
    assert stats[0].scores == 128 + 1 + sum(min(p, 128) for p in range(1, 2049)) + 2048
    cost = CostModel(cfg, "h100-sxm-tp2", 2)
    assert 0 < cost.iteration_latency(plan) < 1.0


def test_workload_duration_and_warmup():
    import numpy as np

    from lpenv.metrics import MetricsRecorder
    from lpenv.workload import WorkloadConfig, generate

    cfg = WorkloadConfig(lengths="sharegpt", rate=5.0, duration_s=600, warmup_s=60)
    requests = generate(cfg, np.random.default_rng(0))
    assert requests[-1].arrival_time < 660 <= requests[-1].arrival_time + 5
    assert abs(len(requests) - 5.0 * 660) < 4 * (5.0 * 660) ** 0.5  # Poisson count
    recorder = MetricsRecorder(measure_from_s=60)
    for r in requests:
        recorder.arrival(r.request_id, r.arrival_time, r.prompt_tokens, r.output_tokens)
    s = recorder.summary()
    assert s["requests_warmup"] == sum(r.arrival_time < 60 for r in requests) > 0
    assert s["requests_total"] + s["requests_warmup"] == len(requests)
    with pytest.raises(ValueError, match="duration_s"):
        WorkloadConfig(duration_s=0)


def test_paper_panel_runs_both_policies_and_draws_the_figure(tmp_path):
    """lpenv-paper on a short window: both policies, the figure, the quoted figures."""
    import json

    from scripts.paper_panel import run_panel

    result = run_panel("arxiv-gptoss", tmp_path, jobs=1, duration_s=30, warmup_s=10,
                       hardware="h100-sxm-tp2", rates=(2.5,))
    folder = tmp_path / "arxiv-gptoss"
    assert (folder / "attainment_vs_rate.png").stat().st_size > 0
    saved = json.loads((folder / "panel.json").read_text())
    assert set(saved["policies"]) == {"chunked-512", "layered-paper-rule"} == set(
        result["policies"])
    for run in saved["runs"]:
        assert run["requests_warmup"] > 0 and run["energy_source"] == "modeled:h100-sxm-tp2"
        assert run["expert_bytes"] > 0


@pytest.mark.parametrize("args,error", [
    (["--hardware", "tpu-v9"], "unknown hardware profile 'tpu-v9'"),
    # The paper's engine needs two H100s: one is refused, saying what would fit.
    (["--hardware", "h100-sxm"], "arxiv-qwen, chunked-512: qwen3-30b-a3b in bfloat16 needs"),
    (["--jobs", "0"], "--jobs must be at least 1"),
    (["--rates", "0", "1.5"], "--rates must be positive"),
    (["--duration", "-5"], "workload.duration_s must be positive"),
])
def test_paper_panel_refuses_bad_runs_before_running(capsys, args, error):
    from scripts.paper_panel import main

    with pytest.raises(SystemExit) as exc:
        main(["arxiv-qwen", *args])
    assert exc.value.code == 2
    assert error in capsys.readouterr().err


def test_calibrated_latency_noise_is_seeded_by_reset(tmp_path, monkeypatch):
    """A profile's latency scatter is drawn per iteration, reproducibly for a reset seed."""
    from dataclasses import replace

    from engine_adapter.hardware import DATASHEET_PROFILES, write_profile

    monkeypatch.setenv("LPENV_PROFILE_DIR", str(tmp_path))
    write_profile(replace(DATASHEET_PROFILES["cpu-generic"], name="noisy", latency_noise_sd=0.2))

    def latencies(seed, noise=True):
        env = gym.make(lpenv.ENV_ID, engine={"model": "qwen3-moe-tiny", "prefill_budget": 512,
                                             "kv_cache_tokens": 8192},
                       workload={"num_requests": 6, "scale": 0.05},
                       backend={"name": "sim", "hardware": "noisy", "latency_noise": noise})
        s = play_trivially(env, seed)["summary"]
        return s["iteration_p50_s"], s["sim_time_s"]

    assert latencies(3) == latencies(3)  # the same seed, the same noise
    assert latencies(3, noise=False) == latencies(3, noise=False) != latencies(3)
