"""Training with stable-baselines3: the env passes SB3's checker, a short MaskablePPO run
beats the random policy, plain PPO refuses (never changes) masked actions."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.env_checker import check_env

import lpenv
from policies.env_configuration import env_config, env_kwargs
from policies.export import learned_from_sb3, load_policy
from policies.learned import LearnedPolicy
from policies.paper_rule import PaperRule
from policies.random_policy import RandomPolicy
from policies.sb3 import (
    DEFAULT_HYPERPARAMS,
    RefuseInvalid,
    ServingMask,
    evaluate,
    make_env,
    train_policy,
    with_activation_class,
)

# A small workload where decisions matter (modeled latency: reproducible episodes). Prompts
# of ~100-600 tokens at 150 requests/s against a 512-token prefill budget; 2-4 output tokens
# keep episodes short. The TBT SLO (4.5 ms) is broken by a 512-token batch run through all
# layers at once (G = 1) beside a decode batch; the TTFT SLO (20 ms, ~5 iterations) punishes
# waiting and large G. Returns on seeds 100-105 (mean; measured 2026-11-28):
#   fixed G=1/2/3/5 staggered 0.34/0.47/0.36/0.32, paper rule 0.35, SLO-aware 0.58,
#   RandomPolicy 0.34 (0.30 on seeds 100-103).
WORKLOAD = {
    "engine": {"model": "qwen3-moe-tiny", "prefill_budget": 512, "kv_cache_tokens": 16384},
    "workload": {"lengths": "arxiv4k", "scale": 0.15, "rate": 150.0, "num_requests": 24,
                 "min_output": 2, "max_output": 4},
    "slo": {"ttft_s": 0.02, "tbt_s": 0.0045},
    "backend": {"latency": "modeled"},
}
EVAL_SEEDS = [100, 101, 102, 103, 104, 105]
SMALL = {**WORKLOAD, "workload": {**WORKLOAD["workload"], "num_requests": 6}}
# (the paper rule's thresholds scale with the chunk: 32-token units put these batches at G > 1)
SMALL_CHUNKED = {**SMALL, "engine": {**SMALL["engine"], "chunk_tokens": 32}}


def test_env_passes_sb3_env_checker():
    # check_env steps with unmasked samples; the env raises on a masked action. While more
    # requests are to arrive and KV blocks are plenty, nothing is masked: check_env's dozen
    # steps stay in that phase of WORKLOAD's 24 arrivals.
    env = gym.make(lpenv.ENV_ID, **WORKLOAD)
    check_env(env, warn=True, skip_render_check=True)
    check_env(env.unwrapped, warn=True, skip_render_check=True)


def test_plain_ppo_view_passes_sb3_env_checker():
    # Where masks do bite (6 requests: the engine idles with none to come), the env as plain
    # PPO sees it refuses masked samples instead of raising.
    env = RefuseInvalid(ServingMask(gym.make(lpenv.ENV_ID, **SMALL)))
    for seed in range(3):
        env.action_space.seed(seed)
        check_env(env, warn=True, skip_render_check=True)


def test_serving_mask_never_waits_on_an_idle_engine():
    env = ServingMask(gym.make(lpenv.ENV_ID, **SMALL))
    env.reset(seed=0)
    u = env.unwrapped
    assert not u.view.decode_context_lens and not u.view.in_flight  # the first request only
    assert u.action_masks()[-2]  # the env allows waiting: more requests will arrive
    mask = env.action_masks()
    assert not mask[-2] and mask[-1]  # the view cannot tell, so the serving mask forbids it


def test_plain_ppo_masked_action_is_refused_not_changed():
    env = RefuseInvalid(ServingMask(gym.make(lpenv.ENV_ID, **SMALL)), penalty=0.25,
                        max_refusals=3)
    obs, _ = env.reset(seed=0)
    now = env.unwrapped.episode.now
    wait = np.array([0, 0, 0])  # masked: the engine is idle
    for i in range(1, 4):
        obs2, reward, terminated, truncated, info = env.step(wait)
        assert reward == -0.25 and not terminated
        assert np.array_equal(obs2, obs) and env.unwrapped.episode.now == now  # no engine step
        assert info["invalid_actions"] == i and "masked out" in info["invalid_action"]
        assert truncated == (i == 3)  # max_refusals in a row end the episode
    env.reset(seed=0)
    _, _, _, _, info = env.step(np.array([0, 3, 1]))
    assert "invalid_action" not in info and info["invalid_actions"] == 0


@pytest.fixture
def one_thread():
    """Training and the engine on one thread: the run (and the figures below) reproduce
    whatever OMP_NUM_THREADS the suite runs under."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_maskable_ppo_beats_random_policy(tmp_path, one_thread):
    # 2,048 steps take ~20-30 s here (~80-110 steps/s on a shared 2-core machine). Measured
    # on seeds 100-105: learned 0.44 (training seed 0), 0.40 (3), 0.51 (4); RandomPolicy 0.34,
    # the paper rule 0.35. On seeds 100-103 with training seeds 0/1/2: 0.38/0.54/0.37 against
    # random's 0.30. (With gamma 0.99 one of three seeds fell below random; see policies/sb3.)
    result = train_policy(WORKLOAD, algo="maskable_ppo", total_timesteps=2048, seed=0,
                          out_dir=tmp_path, eval_seeds=EVAL_SEEDS, progress_bar=False,
                          tensorboard=True)
    rand = evaluate(RandomPolicy(seed=0), env_kwargs(WORKLOAD), EVAL_SEEDS)
    paper = result["paper_rule"]
    learned = result["learned"]
    print(f"learned {learned['return_mean']:.3f}, random {rand['return_mean']:.3f}, "
          f"paper rule {paper['return_mean']:.3f}")
    assert learned["seeds"] == rand["seeds"] == paper["seeds"] == EVAL_SEEDS
    assert learned["return_mean"] > rand["return_mean"] + 0.02
    assert result["total_timesteps"] >= 2048 and result["steps_per_s"] > 0

    paths = result["paths"]
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert list((tmp_path / "checkpoints").glob("*.zip"))
    assert (tmp_path / "model.zip").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["algo"] == "maskable_ppo"
    # The exported artifact is the policy that was evaluated.
    policy = load_policy(paths["policy"])
    assert isinstance(policy, LearnedPolicy)
    again = evaluate(policy, env_kwargs(WORKLOAD), EVAL_SEEDS)
    assert again["returns"] == pytest.approx(learned["returns"])


def test_plain_ppo_trains_and_exports(tmp_path, monkeypatch):
    # Without TensorBoard the progress table stays in the run folder: nothing lands in the
    # system's temp folder (SB3's default: a new SB3-<date> folder per run).
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.delenv("SB3_LOGDIR", raising=False)
    result = train_policy(SMALL_CHUNKED, algo="ppo", total_timesteps=256, seed=0,
                          out_dir=tmp_path, eval_episodes=1, eval_freq=128, progress_bar=False,
                          tensorboard=False, hyperparams={"n_steps": 128})
    assert isinstance(load_policy(result["paths"]["policy"]), LearnedPolicy)
    assert 0.0 <= result["learned"]["attainment_mean"] <= 1.0
    # One evaluation per eval_freq steps; the last step's is the final one, not listed twice.
    assert [e["timesteps"] for e in result["evaluations"]] == [128, 256]
    assert result["evaluations"][-1]["learned"] == result["final"]
    # The exported actor is the best evaluated (the first where two tie), and it is the one
    # that was evaluated: loaded, it gives that evaluation again.
    best = max(result["evaluations"], key=lambda e: e["learned"]["return_mean"])
    assert (result["exported_timesteps"], result["learned"]) == (best["timesteps"],
                                                                  best["learned"])
    exported = json.loads((Path(result["paths"]["policy"]) / "policy.json").read_text())
    assert exported["training"]["num_timesteps"] == best["timesteps"]
    again = evaluate(load_policy(result["paths"]["policy"]), env_kwargs(SMALL_CHUNKED),
                     result["eval_seeds"])
    assert again["returns"] == pytest.approx(result["learned"]["returns"])
    assert [p.name for p in temp.iterdir() if p.name.startswith("SB3")] == []
    # The baseline is the paper's rule as lpenv-eval runs it: thresholds in the engine's chunk
    # size (conf/policy/paper.yaml), not the paper's 512 tokens.
    chunk = SMALL_CHUNKED["engine"]["chunk_tokens"]
    assert result["paper_rule"] == evaluate(PaperRule(unit=chunk), env_kwargs(SMALL_CHUNKED),
                                            result["eval_seeds"])
    progress = Path(result["paths"]["progress"]).read_text().splitlines()
    assert "eval/learned_return" in progress[0] and len(progress) > 1


def test_subproc_vec_env_trains(tmp_path):
    result = train_policy(SMALL, total_timesteps=256, n_envs=2, out_dir=tmp_path,
                          eval_episodes=1, progress_bar=False, tensorboard=False,
                          hyperparams={"n_steps": 64})
    assert result["n_envs"] == 2 and result["total_timesteps"] >= 256


def test_imitation_clones_the_teacher_to_its_level(one_thread):
    """Behaviour cloning (``train.imitate``): an untrained actor is far below the paper rule on
    WORKLOAD; cloned from its decisions on other seeds it takes most of them and serves the
    eval seeds as well as the rule does."""
    from policies import imitation

    config, kwargs, model = _sim_actor(WORKLOAD)
    teacher = imitation.teacher("paper", config)
    assert teacher == PaperRule(unit=config["engine"]["chunk_tokens"])  # as lpenv-eval runs it
    demos = imitation.demonstrate(teacher, make_env(kwargs, monitor=False)(), range(2000, 2006))
    assert len(demos) > 100 and demos.skipped == 0 and demos.episodes == 6
    paper = evaluate(teacher, kwargs, EVAL_SEEDS)["return_mean"]
    before = evaluate(learned_from_sb3(model, config), kwargs, EVAL_SEEDS)["return_mean"]
    stats = imitation.clone(model.policy, demos, epochs=30)
    after = evaluate(learned_from_sb3(model, config), kwargs, EVAL_SEEDS)["return_mean"]
    print(f"paper rule {paper:.3f}; actor before {before:.3f}, cloned {after:.3f} "
          f"(agreement {stats['agreement']:.1%})")
    assert before < paper - 0.05  # (measured: 0.221 against 0.346)
    assert stats["agreement"] > 0.8 and after >= paper - 0.02
    assert stats["decisions"] == len(demos) and stats["epochs"] == 30


def test_imitation_teaches_when_to_wait(one_thread):
    """With 32-token chunks the rule's batches take several iterations and it waits meanwhile:
    three waits to a start. Both are taught (a wait's start bit only), and the clone starts
    and waits where the rule did. The rule's G = 4 on 5 layers is no choice of the action
    space (largest groups 5, 3, 2, 1: G = 1, 2, 3, 5): it is taught as G = 3, the same
    largest group, and counted."""
    from policies import imitation

    config, kwargs, model = _sim_actor({**WORKLOAD, "engine": {**WORKLOAD["engine"],
                                                                "chunk_tokens": 32}})
    demos = imitation.demonstrate(imitation.teacher("paper", config),
                                  make_env(kwargs, monitor=False)(), range(2000, 2006))
    starts = demos.actions[:, 2] == 1
    assert len(demos) > 300 and 0.1 < starts.mean() < 0.5
    assert 0 < demos.rounded < starts.sum()
    assert (demos.actions[~starts] == [0, 3, 0]).all()  # (the placeholder, not learned)
    stats = imitation.clone(model.policy, demos, epochs=60)
    assert stats["start_agreement"] > 0.95 and stats["rounded"] == demos.rounded


def _sim_actor(workload: dict):
    """A workload's normalized config and env kwargs on the simulator, and a fresh
    MaskablePPO with the training defaults."""
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    config = env_config(env_kwargs({**workload, "backend": {"name": "sim"}}))
    kwargs = env_kwargs(config)
    model = MaskablePPO("MlpPolicy", DummyVecEnv([make_env(kwargs)]), seed=0, device="cpu",
                        **with_activation_class(DEFAULT_HYPERPARAMS))
    return config, kwargs, model


def test_training_with_imitation_evaluates_the_clone_first(tmp_path):
    result = train_policy({**SMALL, "backend": {"name": "sim"}}, total_timesteps=128,
                          out_dir=tmp_path, eval_episodes=1, eval_freq=64, progress_bar=False,
                          tensorboard=False, hyperparams={"n_steps": 64}, imitate="paper",
                          imitate_episodes=2, imitate_epochs=3)
    assert [e["timesteps"] for e in result["evaluations"]] == [0, 64, 128]
    cloned = result["imitation"]
    assert cloned["teacher"] == "paper" and cloned["episodes"] == 2 and cloned["epochs"] == 3
    assert json.loads((tmp_path / "summary.json").read_text())["imitation"] == cloned
    # Plain PPO's actor (no masks in its distribution) clones too.
    plain = train_policy({**SMALL, "backend": {"name": "sim"}}, algo="ppo", total_timesteps=64,
                         out_dir=tmp_path / "ppo", eval_episodes=1, progress_bar=False,
                         tensorboard=False, hyperparams={"n_steps": 64}, imitate="paper",
                         imitate_episodes=2, imitate_epochs=3)
    assert plain["imitation"]["decisions"] == cloned["decisions"]
    assert plain["evaluations"][0]["timesteps"] == 0
    for name, says in (("chunked", "cannot teach on a layered engine"),
                       ("learned", "not a hand-written policy")):
        with pytest.raises(ValueError, match=says):
            train_policy(SMALL, total_timesteps=64, out_dir=tmp_path / name, imitate=name,
                         progress_bar=False, tensorboard=False)
    with pytest.raises(ValueError, match="imitate_episodes"):
        train_policy(SMALL, total_timesteps=64, out_dir=tmp_path / "none", imitate="paper",
                     imitate_episodes=0, progress_bar=False, tensorboard=False)
