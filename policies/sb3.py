"""Training with stable-baselines3: MaskablePPO (sb3-contrib) or plain PPO on the env.

``train_policy`` builds the vectorized env (``DummyVecEnv`` for one env, ``SubprocVecEnv``
otherwise), trains, logs to TensorBoard, checkpoints, evaluates against the paper's rule on
fixed seeds, and exports the final actor with ``policies.export.export_sb3``.

Masks. Both algorithms see the env through ``ServingMask``: the env's mask, less waiting on
an idle engine, which is the mask a policy that sees only the ``SchedulerView`` can use (the
server does not know whether more requests will arrive). So the learned policy behaves the
same in the env and behind ``LearnedPolicy.decide``.

* ``maskable_ppo``: samples only valid actions (the mask goes into the action distribution).
* ``ppo``: samples from all of ``MultiDiscrete``. An action the mask forbids is **refused,
  never changed** (``RefuseInvalid``): the engine does not step, the agent gets
  ``-invalid_penalty`` and the same observation, ``info["invalid_action"]`` says why and
  ``info["invalid_actions"]`` counts the episode's refusals; after ``max_refusals`` refusals
  in a row the episode is truncated. Training returns therefore include the penalties; the
  evaluation (and the exported policy) always apply the mask, so they never pick one.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

import lpenv
from lpenv.episode import Episode
from policies import env_configuration, imitation
from policies.export import engine_defaults, export_sb3, learned_from_sb3
from policies.learned import ACTIVATIONS, serving_mask
from policies.paper_rule import PaperRule
from policies.protocol import Policy

ALGOS = ("maskable_ppo", "ppo")
# Defaults for short CPU runs on small workloads; ``hyperparams`` overrides any of them.
# gamma near 1: the undiscounted return is the objective (attainment - lambda x J/token), and
# discounting favours waiting, whose TTFT misses come later than the TBT misses of starting a
# batch now (gamma 0.9 learned to wait almost always: return 0.07-0.15 where random got 0.30;
# 0.999 with lambda 0.98 got 0.37-0.54 in 2,048 steps, tests/test_training.py's workload).
DEFAULT_HYPERPARAMS: dict[str, Any] = {
    "n_steps": 256, "batch_size": 64, "n_epochs": 10, "learning_rate": 3e-4, "gamma": 0.999,
    "gae_lambda": 0.98, "ent_coef": 0.01, "clip_range": 0.2,
    "policy_kwargs": {"net_arch": [64, 64]},
}


class ServingMask(gym.Wrapper):
    """Exposes ``action_masks()``: the env's mask, less waiting on an idle engine."""

    def action_masks(self) -> np.ndarray:
        u = self.env.unwrapped
        env_mask = u.action_masks()
        return serving_mask(u.codec, u.view) & env_mask if u.view is not None else env_mask


class RefuseInvalid(gym.Wrapper):
    """For plain PPO: refuse (do not step, penalize, report) an action the mask forbids."""

    def __init__(self, env: gym.Env, penalty: float = 0.05, max_refusals: int = 64) -> None:
        super().__init__(env)
        self.penalty, self.max_refusals = penalty, max_refusals
        self._obs, self._info = None, {}
        self._refused = self._in_a_row = 0

    def reset(self, **kwargs):
        self._obs, self._info = self.env.reset(**kwargs)
        self._refused = self._in_a_row = 0
        return self._obs, {**self._info, "invalid_actions": 0}

    def step(self, action):
        mask = self.env.get_wrapper_attr("action_masks")()
        a = np.asarray(action).reshape(-1)
        bad = self.env.unwrapped.codec.masked_components(a, mask)
        if not bad:
            self._in_a_row = 0
            self._obs, reward, term, trunc, self._info = self.env.step(action)
            return self._obs, reward, term, trunc, {**self._info,
                                                    "invalid_actions": self._refused}
        self._refused += 1
        self._in_a_row += 1
        info = {**self._info, "invalid_actions": self._refused,
                "invalid_action": f"action {a.tolist()}: components {bad} masked out "
                                  f"(mask {mask.astype(int).tolist()}); refused"}
        return self._obs, -self.penalty, False, self._in_a_row >= self.max_refusals, info


def make_env(kwargs: dict, algo: str = "maskable_ppo", invalid_penalty: float = 0.05,
             monitor: bool = True) -> Callable[[], gym.Env]:
    """A factory for one training env (picklable, for ``SubprocVecEnv``)."""

    def build() -> gym.Env:
        env: gym.Env = ServingMask(gym.make(lpenv.ENV_ID, **kwargs))
        if algo == "ppo":
            env = RefuseInvalid(env, invalid_penalty)
        if monitor:
            from stable_baselines3.common.monitor import Monitor

            env = Monitor(env, info_keywords=("invalid_actions",) if algo == "ppo" else ())
        return env

    return build


def evaluate(policy: Policy, kwargs: dict, seeds: Sequence[int]) -> dict:
    """Episodes on ``seeds`` with ``policy`` deciding in place (``Episode.run``); the same
    seed gives the same workload for every policy."""
    env = gym.make(lpenv.ENV_ID, **kwargs).unwrapped
    summaries = []
    for seed in seeds:
        env.reset(seed=int(seed))
        episode: Episode = env.episode
        summaries.append(episode.run(policy))
    returns = [s["return"] for s in summaries]
    attainment = [s["slo_attainment"] for s in summaries]
    return {"seeds": [int(s) for s in seeds], "returns": returns, "attainment": attainment,
            "return_mean": float(np.mean(returns)), "attainment_mean": float(np.mean(attainment)),
            "energy_per_token_j_mean": float(np.mean([s["energy_per_token_j"]
                                                      for s in summaries]))}


def _callbacks(config: dict, kwargs: dict, seeds: Sequence[int], eval_freq: int | None,
               paper: dict, log: list, evaluate_first: bool = False):
    from stable_baselines3.common.callbacks import BaseCallback

    class CompareToPaperRule(BaseCallback):
        """Every ``eval_freq`` steps: the current actor (masked, deterministic) against the
        paper's rule on the eval seeds; logged to TensorBoard and printed with steps/s. Keeps
        the actor with the best evaluated return so far (``best``: its timesteps, evaluation
        and weights)."""

        best: dict | None = None

        def _on_training_start(self) -> None:
            self.t0, self.last = time.perf_counter(), 0
            if evaluate_first:  # (a cloned actor: a candidate before any RL)
                self.evaluate()

        def _on_step(self) -> bool:
            if eval_freq and self.num_timesteps - self.last >= eval_freq:
                self.last = self.num_timesteps
                self.evaluate()
            return True

        def evaluate(self) -> dict:
            learned = evaluate(learned_from_sb3(self.model, config), kwargs, seeds)
            rate = self.num_timesteps / (time.perf_counter() - self.t0)
            for who, r in (("learned", learned), ("paper_rule", paper)):
                self.logger.record(f"eval/{who}_return", r["return_mean"])
                self.logger.record(f"eval/{who}_attainment", r["attainment_mean"])
            self.logger.record("time/steps_per_s", rate)
            self.logger.dump(self.num_timesteps)
            log.append({"timesteps": self.num_timesteps, "steps_per_s": rate,
                        "learned": learned})
            if self.best is None or learned["return_mean"] > self.best["learned"]["return_mean"]:
                self.best = {"timesteps": self.num_timesteps, "learned": learned,
                             "weights": copy.deepcopy(self.model.policy.state_dict())}
            print(f"[{self.num_timesteps} steps, {rate:.0f} steps/s] eval return: learned "
                  f"{learned['return_mean']:.3f} (attainment {learned['attainment_mean']:.3f}),"
                  f" paper rule {paper['return_mean']:.3f} "
                  f"(attainment {paper['attainment_mean']:.3f})", flush=True)
            return learned

    return CompareToPaperRule()


def with_activation_class(params: dict) -> dict:
    """Hyperparameters with ``policy_kwargs.activation_fn`` given by name (``relu``: what a
    command line or a config can say) as the torch module class SB3 takes."""
    kwargs = params.get("policy_kwargs") or {}
    name = kwargs.get("activation_fn")
    if not isinstance(name, str):
        return params
    if name not in ACTIVATIONS:
        raise ValueError(f"policy_kwargs.activation_fn {name!r} is not one of "
                         f"{sorted(ACTIVATIONS)}")
    return {**params, "policy_kwargs": {**kwargs, "activation_fn": ACTIVATIONS[name]}}


def _progress_bar_available() -> bool:
    try:
        import rich  # noqa: F401  (SB3's progress bar needs tqdm and rich)
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


def train_policy(env_kwargs: dict | None = None, algo: str = "maskable_ppo",
                 total_timesteps: int = 10_000, seed: int = 0, n_envs: int = 1,
                 out_dir: str | Path = "runs/train", eval_episodes: int = 2,
                 eval_freq: int | None = None, progress_bar: bool = True,
                 tensorboard: bool = True, hyperparams: dict | None = None, *,
                 eval_seeds: Sequence[int] | None = None, checkpoint_freq: int | None = None,
                 invalid_penalty: float = 0.05, verbose: int = 0,
                 keep_best: bool = True, imitate: str | None = None,
                 imitate_episodes: int = 30, imitate_epochs: int = 60) -> dict:
    """Train a policy on ``gymnasium.make("lpenv/LayeredPrefill-v1", **env_kwargs)``.

    Writes under ``out_dir``: ``tb/`` (TensorBoard; ``log/progress.csv`` without it),
    ``checkpoints/``, ``model.zip`` (the SB3 model), ``env_config.json``, ``policy/`` (the
    exported artifact) and ``summary.json``. Nothing outside it.
    ``eval_seeds`` default to ``1000, 1001, ...`` (``eval_episodes`` of them), apart from the
    training seeds (``seed``, ``seed + 1``, ... for the ``n_envs`` envs). ``eval_freq`` in
    environment steps (all envs together); None evaluates only at the end.
    ``keep_best``: the exported actor is the one whose evaluation had the best return (the
    final one where none beat it; ``model.zip`` is always the final model).
    ``imitate``: a hand-written policy's name (``paper``): before RL the actor is cloned from
    its decisions on ``imitate_episodes`` episodes, ``imitate_epochs`` passes
    (``policies.imitation``), and evaluated at step 0, so that ``keep_best`` can export it.

    Returns the exported actor's (``learned``), the final actor's and the paper rule's
    evaluations, every evaluation, steps/s and the paths.
    """
    kwargs = dict(env_kwargs or {})
    if algo not in ALGOS:
        raise ValueError(f"algo must be one of {ALGOS}, got {algo!r}")
    if n_envs < 1 or total_timesteps < 1 or eval_episodes < 1:
        raise ValueError("n_envs, total_timesteps and eval_episodes must be positive")
    if imitate is not None and (imitate_episodes < 1 or imitate_epochs < 1):
        raise ValueError("train.imitate_episodes and train.imitate_epochs must be positive, "
                         f"got {imitate_episodes} and {imitate_epochs}")
    from stable_baselines3.common.callbacks import CallbackList, CheckpointCallback
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = env_configuration.env_config(kwargs)
    kwargs = env_configuration.env_kwargs(config)  # complete: what the artifact records
    teacher = imitation.teacher(imitate, config) if imitate is not None else None
    (out / "env_config.json").write_text(json.dumps(config, indent=2) + "\n")
    seeds = list(eval_seeds) if eval_seeds is not None else [1000 + i
                                                             for i in range(eval_episodes)]

    fns = [make_env(kwargs, algo, invalid_penalty) for _ in range(n_envs)]
    venv = DummyVecEnv(fns) if n_envs == 1 else SubprocVecEnv(fns)
    params = {**DEFAULT_HYPERPARAMS, **(hyperparams or {})}
    common = {"seed": seed, "verbose": verbose, "device": "cpu",
              "tensorboard_log": str(out / "tb") if tensorboard else None}
    if algo == "maskable_ppo":
        from sb3_contrib import MaskablePPO

        model = MaskablePPO("MlpPolicy", venv, **common, **with_activation_class(params))
    else:
        from stable_baselines3 import PPO

        model = PPO("MlpPolicy", venv, **common, **with_activation_class(params))
    if not tensorboard:
        # (SB3 would log into a new SB3-<date> folder under the system's temp folder, one per
        # run, left behind: the run folder keeps the progress table instead)
        from stable_baselines3.common.logger import configure

        model.set_logger(configure(str(out / "log"), ["stdout", "csv"] if verbose else ["csv"]))

    # The paper's rule as lpenv-eval runs it: its thresholds in the engine's chunk size (the
    # paper's 512 tokens on a CPU-scaled engine would make nearly every batch G = 1).
    paper = evaluate(PaperRule(**engine_defaults("paper", config)), kwargs, seeds)
    cloned = None
    if teacher is not None:
        demo_env = make_env(kwargs, monitor=False)()
        demos = imitation.demonstrate(teacher, demo_env, range(
            imitation.DEMONSTRATION_SEED, imitation.DEMONSTRATION_SEED + imitate_episodes))
        demo_env.close()
        cloned = {"teacher": imitate, **imitation.clone(model.policy, demos, imitate_epochs,
                                                          seed=seed)}
        print(f"cloned {imitate}'s {cloned['decisions']} decisions on {imitate_episodes} "
              f"episodes: the actor takes {cloned['agreement']:.1%} of them", flush=True)
    log: list[dict] = []
    compare = _callbacks(config, kwargs, seeds, eval_freq, paper, log,
                         evaluate_first=cloned is not None)
    every = max(1, (checkpoint_freq or max(total_timesteps // 4, 1)) // n_envs)
    checkpoints = CheckpointCallback(every, str(out / "checkpoints"), name_prefix=algo)
    if progress_bar and not _progress_bar_available():
        print("progress bar off: stable-baselines3's needs `rich` (pip install rich)")
        progress_bar = False

    t0 = time.perf_counter()
    model.learn(total_timesteps, callback=CallbackList([compare, checkpoints]),
                tb_log_name=algo, progress_bar=progress_bar)
    train_s = time.perf_counter() - t0
    rate = model.num_timesteps / train_s
    print(f"trained {model.num_timesteps} steps in {train_s:.1f} s: {rate:.0f} steps/s")
    venv.close()

    # The final actor, masked and deterministic (evaluated already where the last
    # evaluation fell on the last step: the same actor, the same result).
    final = (log[-1]["learned"] if log and log[-1]["timesteps"] == model.num_timesteps
             else compare.evaluate())
    model.save(out / "model.zip")  # the final model, to train on from
    exported_at, learned = int(model.num_timesteps), final
    if keep_best and compare.best["timesteps"] != model.num_timesteps:
        # PPO can lose what it had learned (on make train's workload one run's best actor came
        # at 6,144 of 50,176 steps and attained 94% at 3 req/s, its last 60%): the actor that
        # evaluated best on the eval seeds is the one exported.
        model.policy.load_state_dict(compare.best["weights"])
        exported_at, learned = compare.best["timesteps"], compare.best["learned"]
    policy_dir = export_sb3(model, config, out / "policy", timesteps=exported_at)
    result = {
        "algo": algo, "total_timesteps": int(model.num_timesteps), "seed": seed,
        "n_envs": n_envs, "train_s": train_s, "steps_per_s": rate, "eval_seeds": seeds,
        "learned": learned, "exported_timesteps": exported_at, "final": final,
        "paper_rule": paper, "evaluations": log, "imitation": cloned,
        "hyperparams": {k: v for k, v in params.items()},
        "paths": {"out_dir": str(out), "model": str(out / "model.zip"),
                  "policy": str(policy_dir), "env_config": str(out / "env_config.json"),
                  "checkpoints": str(out / "checkpoints"),
                  "tensorboard": str(out / "tb") if tensorboard else None,
                  "progress": None if tensorboard else str(out / "log" / "progress.csv"),
                  "summary": str(out / "summary.json")},
    }
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result
