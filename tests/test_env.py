"""The environment against Gymnasium's rules: API compliance, determinism, masks, rewards."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lpenv
from engine_adapter.decision import Decision
from lpenv.actions import InvalidAction, default_group_choices

SMALL = dict(
    engine={"model": "qwen3-moe-tiny", "kv_cache_tokens": 4096, "prefill_budget": 256},
    workload={"lengths": "arxiv4k", "scale": 0.03, "rate": 30.0, "num_requests": 10,
              "max_output": 12},
    slo={"ttft_s": 0.05, "tbt_s": 0.0026},
    backend={"latency": "modeled"},
)


def make(**overrides):
    return gym.make(lpenv.ENV_ID, **{**SMALL, **overrides})


def last_valid(mask: np.ndarray, nvec) -> list[int]:
    parts = np.split(mask, np.cumsum(nvec)[:-1])
    return [int(np.flatnonzero(p)[-1]) for p in parts]


def play(env, seed: int, chooser=last_valid):
    obs, info = env.reset(seed=seed)
    trace = [obs]
    rewards = []
    while True:
        action = chooser(env.unwrapped.action_masks(), env.unwrapped.codec.nvec)
        obs, reward, terminated, truncated, info = env.step(action)
        trace.append(obs)
        rewards.append(reward)
        if terminated or truncated:
            return trace, rewards, info, terminated, truncated


@pytest.mark.parametrize("env_id", [k for k in gym.registry if k.startswith("lpenv/")])
def test_gymnasium_env_checker_on_every_registered_spec(env_id):
    env = gym.make(env_id, **SMALL).unwrapped
    check_env(env, skip_render_check=True)


def test_spec_registration():
    spec = gym.spec(lpenv.ENV_ID)
    assert spec.nondeterministic  # measured latencies by default
    env = make()
    assert isinstance(env.action_space, gym.spaces.MultiDiscrete)
    assert env.observation_space.contains(env.reset(seed=0)[0])


def test_same_seed_same_episode_with_modeled_latency():
    a = play(make(), seed=11)
    b = play(make(), seed=11)
    assert len(a[0]) == len(b[0])
    for x, y in zip(a[0], b[0]):
        np.testing.assert_array_equal(x, y)
    assert a[1] == b[1]
    c = play(make(), seed=12)
    assert len(c[0]) != len(a[0]) or any(
        not np.array_equal(x, y) for x, y in zip(a[0], c[0]))


def test_return_equals_recomputed_objective_from_token_events():
    env = make()
    _, rewards, info, terminated, _ = play(env, seed=5)
    assert terminated
    ep = env.unwrapped.episode
    slo, lam = env.unwrapped.slo, env.unwrapped.reward_config.energy_weight
    # Recompute the paper's attainment from the raw token events, not through the recorder.
    times: dict[str, list[float]] = {}
    for rec in ep.recorder.requests.values():
        times[rec.request_id] = list(rec.token_times)
    attained = 0
    tokens = 0
    for rec in ep.recorder.requests.values():
        t = times[rec.request_id]
        ok = (len(t) == rec.max_tokens and t[0] - rec.arrival_time <= slo.ttft_s
              and all(b - a <= slo.tbt_s for a, b in zip(t, t[1:])))
        attained += ok
        tokens += rec.prompt_tokens + len(t)
    energy = ep.recorder.energy_j
    objective = attained / len(times) - lam * energy / tokens
    assert sum(rewards) == pytest.approx(objective, abs=1e-9)
    summary = info["summary"]
    assert summary["slo_attainment"] == pytest.approx(attained / len(times))
    assert 0 < attained < len(times), "the test workload should have both hits and misses"


def test_truncation_settles_nothing_and_observes_the_state_it_cut():
    env = make(horizon_s=0.12)
    _, rewards, info, terminated, truncated = play(env, seed=5)
    assert truncated and not terminated
    s = info["summary"]
    assert s["requests_finished"] < s["requests_total"]  # arrived but cut off
    ep = env.unwrapped.episode
    assert ep.pending  # never arrived: not counted
    # The return holds the misses known by the cut, nothing more (SB3 bootstraps the rest);
    # the summary counts every unfinished request as a miss (the paper's metric).
    n = len(ep.recorder.requests) + len(ep.pending)
    lam = env.unwrapped.reward_config.energy_weight
    known = 1 - len(ep.rewards.missed) / n - lam * ep.recorder.energy_j / ep.rewards.planned_tokens
    assert sum(rewards) == pytest.approx(known)
    assert s["slo_attainment"] <= 1 - len(ep.rewards.missed) / s["requests_total"]
    unfinished = [r for r in ep.recorder.requests.values() if not r.finished]
    assert unfinished and not all(r.request_id in ep.rewards.missed for r in unfinished)
    # The last observation is the state cut short, not zeros: requests are still there.
    obs = env.unwrapped.codec_obs()
    assert env.observation_space.contains(obs) and obs.any()


def test_return_equals_the_summary_objective_with_a_warm_up():
    """Warm-up requests are served but left out of the summary's attainment: the reward
    leaves them out too."""
    workload = {**SMALL["workload"], "num_requests": 24, "rate": 60.0, "warmup_s": 0.1}
    for seed in range(3):
        env = make(workload=workload, slo={"ttft_s": 0.02, "tbt_s": 0.0026})
        _, rewards, info, terminated, _ = play(env, seed=seed)
        s = info["summary"]
        assert terminated and s["requests_warmup"] > 0
        lam = env.unwrapped.reward_config.energy_weight
        assert sum(rewards) == pytest.approx(s["slo_attainment"] - lam * s["energy_per_token_j"],
                                             abs=1e-9)


@pytest.mark.parametrize("case", ["all rejected", "horizon before the first arrival"])
def test_an_episode_over_at_reset_ends_at_the_first_step(case):
    if case == "all rejected":  # one prompt longer than the model holds
        env = make(workload={**SMALL["workload"], "num_requests": 1, "scale": 1.0,
                             "min_prompt": 5000, "max_prompt": 5000})
    else:
        env = make(horizon_s=1e-6)
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs) and "summary" in info
    assert info["summary"]["sim_time_s"] == 0.0
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert (terminated, truncated) == ((True, False) if case == "all rejected" else
                                       (False, True))
    assert "summary" in info
    if case == "all rejected":
        assert info["summary"]["requests_rejected"] == 1
        assert reward == pytest.approx(info["summary"]["slo_attainment"])  # 0: nothing served
    with pytest.raises(RuntimeError, match="over"):
        env.step(env.action_space.sample())


def test_one_seed_one_workload_on_every_backend():
    def workload(backend):
        env = make(backend=backend)
        env.reset(seed=3)
        ep = env.unwrapped.episode
        return ([(r.request_id, r.arrival_time, r.prompt_tokens, r.max_tokens)
                 for r in ep.recorder.requests.values()]
                + [(r.request_id, r.arrival_time, r.prompt_tokens, r.output_tokens)
                   for r in ep.pending])

    assert workload({"name": "sim", "hardware": "cpu-generic"}) == workload(
        {"latency": "modeled"})


def test_rate_max_scales_the_observation_to_the_top_of_the_range():
    # (each reset's own rate: tests/test_workload.py)
    env = make(workload={**SMALL["workload"], "rate": 10.0, "rate_max": 40.0},
               backend={"name": "sim"})
    assert env.unwrapped.obs_spec.rate_scale == 40.0
    assert make().unwrapped.obs_spec.rate_scale == SMALL["workload"]["rate"]
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)


def test_a_reset_env_copies_and_unpickles_and_goes_on_alike():
    import copy
    import pickle

    env = make()  # modeled latency: the cost model wraps the real executor
    env.reset(seed=4)
    env.step(last_valid(env.unwrapped.action_masks(), env.unwrapped.codec.nvec))
    twins = [copy.deepcopy(env), pickle.loads(pickle.dumps(env))]
    rest = play_on(env)
    assert all(play_on(twin) == rest for twin in twins)


def play_on(env) -> list:
    """The rest of an episode already reset: rewards and the final summary's figures."""
    out = []
    while True:
        obs, reward, terminated, truncated, info = env.step(
            last_valid(env.unwrapped.action_masks(), env.unwrapped.codec.nvec))
        out.append((obs.tolist(), reward))
        if terminated or truncated:
            return out + [info["summary"]["slo_attainment"], info["summary"]["energy_j"]]


def test_max_decisions_truncates():
    env = make(max_decisions=3)
    trace, *_ , truncated = play(env, seed=1)
    assert truncated and len(trace) == 4


def test_masked_or_out_of_range_actions_raise():
    env = make()
    env.reset(seed=0)
    mask = env.unwrapped.action_masks()
    nvec = env.unwrapped.codec.nvec
    assert mask.shape == (sum(nvec),)
    with pytest.raises(InvalidAction, match="outside"):
        env.step([len(env.unwrapped.codec.group_choices), 0, 1])
    with pytest.raises(InvalidAction, match="outside"):
        env.step([0, 0])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), kv_tokens=st.sampled_from([512, 1024, 4096]),
       levels=st.integers(1, 5))
def test_every_action_the_mask_allows_is_taken_as_its_level_says(seed, kv_tokens, levels):
    """Random mask-allowed actions on the sim backend, with KV blocks often short: none is
    refused (the mask and the engine agree on the KV blocks), and each level admits the
    longest FCFS prefix whose requests start within its share of the prefill budget, each as
    the top level would."""
    env = gym.make(lpenv.ENV_ID, engine={**SMALL["engine"], "kv_cache_tokens": kv_tokens,
                                         "max_model_len": 512},
                   workload={**SMALL["workload"], "scale": 0.06}, slo=SMALL["slo"],
                   admission_levels=levels, backend={"name": "sim"})
    env.reset(seed=seed)
    codec, rng = env.unwrapped.codec, np.random.default_rng(seed)
    starts = 0
    while True:
        mask = env.unwrapped.action_masks()
        parts = np.split(mask, np.cumsum(codec.nvec)[:-1])
        action = [int(rng.choice(np.flatnonzero(p))) for p in parts]
        view, episode = env.unwrapped.view, env.unwrapped.episode
        decision = codec.decode(action, view, episode.can_wait())
        if decision.admit:
            starts += 1
            tokens = [t for _, t in view.allot(decision)]
            within, top = view.level_share(action[1], levels), view.fcfs_admission()
            assert decision.admit == top[:len(decision.admit)]
            assert sum(tokens[:-1]) < within  # the last one starts within the level's share
            assert len(top) == len(decision.admit) or sum(tokens) >= within  # and no more
        _, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            break
    summary = info["summary"]
    assert starts > 0
    assert summary["requests_finished"] + summary["requests_rejected"] == 10


def test_encode_gives_the_action_that_decodes_to_the_decision():
    """``ActionCodec.encode`` (what imitation learns from) is ``decode``'s inverse over an
    episode of random valid actions; decisions no action means are refused, not rounded."""
    env = make(group_choices=[1, 3, 5], backend={"name": "sim"})
    env.reset(seed=3)
    u = env.unwrapped
    codec, rng = u.codec, np.random.default_rng(3)
    starts = skipped_head = 0
    while True:
        parts = np.split(u.action_masks(), np.cumsum(codec.nvec)[:-1])
        action = [int(rng.choice(np.flatnonzero(p))) for p in parts]
        view, can_wait = u.view, u.episode.can_wait()
        decision = codec.decode(action, view, can_wait)
        again = codec.encode(decision, view)
        assert codec.decode(again, view, can_wait) == decision
        if decision.admit:
            starts += 1
            assert again[0] == action[0] and again[1] <= action[1]  # the lowest such level
            with pytest.raises(InvalidAction, match="group_choices"):
                codec.encode(Decision(2, decision.admit), view)
            with pytest.raises(InvalidAction, match="budget"):
                codec.encode(Decision(1, decision.admit, budget=view.prefill_budget - 1), view)
            if len(view.waiting) > 1:  # the head skipped: no level admits that
                skipped_head += 1
                with pytest.raises(InvalidAction, match="admission levels"):
                    codec.encode(Decision(1, (view.waiting[1].request_id,)), view)
        else:
            assert again == [0, codec.admission_levels - 1, 0]
        _, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            break
    assert starts > 0 and skipped_head > 0


def test_wait_is_masked_when_nothing_runs_and_nothing_will_arrive():
    env = make(workload={**SMALL["workload"], "num_requests": 1})
    env.reset(seed=0)
    mask = env.unwrapped.action_masks()
    assert not mask[-2] and mask[-1]  # must start: waiting would wait forever
    with pytest.raises(InvalidAction, match="masked"):
        env.step([0, 0, 0])


def test_stagger_can_be_forbidden():
    env = make(allow_stagger=False, workload={**SMALL["workload"], "rate": 1000.0})
    env.reset(seed=0)
    sched = env.unwrapped.episode.engine.scheduler
    assert sched.max_in_flight == 1  # the engine enforces it, so it need not stop to ask
    g_idx = len(env.unwrapped.codec.group_choices) - 1
    g = env.unwrapped.codec.group_choices[g_idx]
    for _ in range(5):
        assert not env.unwrapped.view.in_flight, "no decision while a batch is in flight"
        before = sched.iteration
        *_, term, trunc, _ = env.step([g_idx, 0, 1])
        if term or trunc:
            break
        assert sched.iteration - before >= g  # the batch ran all its stages first
    with_stagger = make(allow_stagger=True, workload={**SMALL["workload"], "rate": 1000.0})
    with_stagger.reset(seed=0)
    with_stagger.step([g_idx, 0, 1])
    assert with_stagger.unwrapped.view.in_flight  # asked again while the batch is in flight


def test_default_group_choices_have_distinct_group_sizes():
    assert default_group_choices(48) == (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 48)
    assert default_group_choices(8) == (1, 2, 3, 4, 8)
    with pytest.raises(ValueError, match="exceed"):
        make(group_choices=[1, 99])


def test_render_text_shows_queue_batches_and_decodes():
    env = make(render_mode="ansi", workload={**SMALL["workload"], "rate": 1000.0})
    env.reset(seed=0)
    env.step([len(env.unwrapped.codec.group_choices) - 1, 0, 1])
    text = env.render()
    assert "queue[" in text and "decode[" in text and "batch" in text
    assert "stage" in text and "/" in text


def test_render_rgb_array_draws_the_state_and_passes_gymnasium_render_check():
    # gymnasium's check_env renders in the env's render_mode and checks the frame.
    check_env(make(render_mode="rgb_array").unwrapped)
    env = make(render_mode="rgb_array", workload={**SMALL["workload"], "rate": 1000.0})
    with pytest.raises(RuntimeError, match="reset"):
        env.unwrapped.render()
    env.reset(seed=0)
    first = env.render()
    assert first.shape == (480, 640, 3) and first.dtype == np.uint8
    env.step([len(env.unwrapped.codec.group_choices) - 1, 0, 1])
    second = env.render()
    assert second.shape == first.shape and not np.array_equal(first, second)
    env.close()
    env.close()  # (twice is harmless)


def test_stable_baselines3_make_vec_env_builds_it():
    """``make_vec_env`` asks for render_mode="rgb_array" by default; MaskablePPO reads each
    env's masks through ``env_method``."""
    from stable_baselines3.common.env_util import make_vec_env

    venv = make_vec_env(lpenv.ENV_ID, n_envs=2, seed=0, env_kwargs=SMALL)
    obs = venv.reset()
    assert obs.shape == (2, *venv.observation_space.shape)
    masks = venv.env_method("action_masks")
    assert len(masks) == 2 and all(m.dtype == bool for m in masks)
    action = np.array([last_valid(m, venv.action_space.nvec) for m in masks])
    obs, rewards, dones, infos = venv.step(action)
    assert obs.shape[0] == 2 and len(rewards) == 2
    assert venv.get_images()[0].shape == (480, 640, 3)
    venv.close()


def test_a_partial_section_keeps_the_envs_other_defaults():
    env = gym.make(lpenv.ENV_ID, engine={"prefill_budget": 256}, workload={"num_requests": 5},
                   backend={"latency": "modeled"}).unwrapped
    assert env.engine_config.model == "qwen3-moe-tiny"  # not EngineConfig's 805 MB CPU model
    assert (env.engine_config.prefill_budget, env.engine_config.kv_cache_tokens) == (256, 8192)
    w = env.workload_config
    assert (w.num_requests, w.scale, w.rate, w.lengths) == (5, 0.05, 4.0, "arxiv4k")


def test_numpy_counts_are_counts_and_other_numbers_are_refused_up_front():
    env = make(group_choices=np.arange(1, 4), admission_levels=np.int64(2))
    codec = env.unwrapped.codec
    assert codec.group_choices == (1, 2, 3) and type(codec.group_choices[0]) is int
    env.reset(seed=0)
    env.step([2, 1, 1])  # G = 3 starts (it raised "got np.int64(3)" in the scheduler)
    for bad in ({"admission_levels": 2.5}, {"admission_levels": 0},
                {"group_choices": [1, 2.5]}, {"group_choices": [True]}):
        with pytest.raises(ValueError, match="positive integer"):
            make(**bad)
    # A KV cache too small for one request is a configuration error at make, not at reset.
    with pytest.raises(ValueError, match="cannot hold even one request"):
        make(engine={**SMALL["engine"], "kv_cache_tokens": 256})


def test_measured_latency_warms_the_engine_up_once_before_the_first_episode(monkeypatch):
    import lpenv.env as env_module

    calls = []
    real = env_module.warm_up
    monkeypatch.setattr(env_module, "warm_up", lambda *a: calls.append(a) or real(*a))
    env = make(backend={"latency": "measured"})
    env.reset(seed=0)
    env.reset(seed=1)
    assert len(calls) == 1
    make().reset(seed=0)  # modeled latency: nothing measured, nothing to warm
    assert len(calls) == 1


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown key\(s\) engine.chunk; engine takes"):
        make(engine={"model": "qwen3-moe-tiny", "chunk": 5})
    with pytest.raises(ValueError, match="vLLM has no layered prefill"):
        make(backend={"name": "vllm"})
    with pytest.raises(ValueError, match="layered"):
        make(engine={"model": "qwen3-moe-tiny", "mode": "chunked"})
    with pytest.raises(ValueError, match=r"slo.tbt_s must be given \(no default\)"):
        make(slo={"ttft_s": 3.0})
    with pytest.raises(ValueError, match="latency_noise must be true or false"):
        make(backend={"name": "sim", "latency_noise": "false"})


@pytest.mark.parametrize("kwargs,error", [
    ({"energy_scale": 0}, "energy_scale must be positive"),  # was a ZeroDivisionError
    ({"rate_scale": 0}, "rate_scale must be positive"),  # was the workload's rate, silently
    ({"rate_scale": -1.0}, "rate_scale must be positive"),
    ({"queue_slots": -2}, "queue_slots must be a non-negative integer"),
    ({"horizon_s": 0}, "horizon_s must be positive or None"),  # was an episode of no steps
    ({"max_decisions": 0}, "max_decisions must be a positive integer or None"),
    ({"group_choices": []}, "group_choices must list at least one G"),  # was the default
])
def test_env_settings_out_of_range_are_refused_when_made(kwargs, error):
    with pytest.raises(ValueError, match=error):
        make(**kwargs)


def test_subproc_vec_env():
    from stable_baselines3.common.vec_env import SubprocVecEnv

    vec = SubprocVecEnv([lambda: make() for _ in range(2)], start_method="spawn")
    try:
        obs = vec.reset()
        assert obs.shape == (2, make().observation_space.shape[0])
        masks = vec.env_method("action_masks")
        actions = np.array([last_valid(m, make().unwrapped.codec.nvec) for m in masks])
        obs, rewards, dones, infos = vec.step(actions)
        assert obs.shape[0] == 2 and len(rewards) == 2
    finally:
        vec.close()
