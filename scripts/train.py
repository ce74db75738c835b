"""lpenv-train: train PPO or MaskablePPO on lpenv/LayeredPrefill-v1 and export the policy.

A thin Hydra entry around ``policies.sb3.train_policy``: the env takes the config's engine,
workload, slo, reward and backend sections and ``env.*``; ``train.*`` says how to train. The
run directory (``outputs/train/<date>/<time>``, or ``train.out_dir``) gets TensorBoard logs
(``tb/``), checkpoints, ``model.zip``, the exported policy (``policy/``) and ``summary.json``
with the learned policy's and the paper rule's evaluations; the exported policy is also
copied to ``train.export_path`` (``results/learned/policy``), where ``lpenv-eval
policy=learned`` and ``make run`` find it.

Examples::

    lpenv-train                                          # MaskablePPO, 20k steps
    lpenv-train train=ppo train.total_timesteps=5000 train.n_envs=2
    lpenv-train model=qwen3-moe-tiny train.total_timesteps=512 train.eval_freq=256
    tensorboard --logdir outputs/train
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lpenv.config_schema import (
    ALGOS,
    SECTIONS,
    TrainConfig,
    check_top_level,
    env_kwargs,
    register_configs,
    to_dataclass,
)

# An absolute path: the entry point finds conf/ from any working directory.
CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"
register_configs()
log = logging.getLogger("lpenv.train")


def check_export_path(target: Path) -> None:
    """Only an earlier export (or an empty folder) is replaced: ``export_path=results`` would
    otherwise delete every result."""
    if target.exists() and not (target.is_dir() and ((target / "policy.json").is_file()
                                                      or not any(target.iterdir()))):
        raise ValueError(f"train.export_path {target} exists and is not a policy artifact "
                         "(no policy.json): refusing to replace it")


def check(cfg: DictConfig) -> None:
    """Config mistakes as one clear message, before anything is built."""
    check_top_level(cfg, TrainConfig)
    for name in SECTIONS:
        to_dataclass(name, cfg[name])
    if cfg.engine.mode != "layered":
        raise ValueError("engine.mode must be layered: the env drives layered prefill")
    t = cfg.train
    if t.export_path:
        check_export_path(Path(t.export_path))
    if t.algo not in ALGOS:
        raise ValueError(f"train.algo must be one of {ALGOS}, got {t.algo!r}")
    for key in ("total_timesteps", "n_envs", "eval_episodes", "imitate_episodes",
                "imitate_epochs"):
        if t[key] < 1:
            raise ValueError(f"train.{key} must be positive, got {t[key]}")
    from lpenv.env import LayeredPrefillEnv  # specs and checks only: no model is built
    from policies.env_configuration import env_config
    from policies.imitation import teacher
    from policies.sb3 import with_activation_class

    LayeredPrefillEnv(**env_kwargs(cfg)).close()  # env.* values, the backend, the memory
    with_activation_class(OmegaConf.to_container(t.hyperparams, resolve=True))
    if t.imitate is not None:
        teacher(t.imitate, env_config(env_kwargs(cfg)))


def train(cfg: DictConfig, out_dir: Path) -> dict:
    from policies.sb3 import train_policy  # the training stack, only when training

    t = cfg.train
    result = train_policy(
        env_kwargs=env_kwargs(cfg), algo=t.algo, total_timesteps=t.total_timesteps,
        seed=cfg.seed, n_envs=t.n_envs, out_dir=str(out_dir), eval_episodes=t.eval_episodes,
        eval_freq=t.eval_freq, progress_bar=t.progress_bar, tensorboard=t.tensorboard,
        hyperparams=OmegaConf.to_container(t.hyperparams, resolve=True),
        checkpoint_freq=t.checkpoint_freq, invalid_penalty=t.invalid_penalty,
        keep_best=t.keep_best, imitate=t.imitate, imitate_episodes=t.imitate_episodes,
        imitate_epochs=t.imitate_epochs)
    exported = Path(result["paths"]["policy"])
    if t.export_path:
        target = Path(t.export_path)
        if target.exists():
            check_export_path(target)
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(exported, target)
        result["paths"]["published"] = str(target)
    return result


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _main(cfg: DictConfig) -> float:
    try:
        check(cfg)
    except (ValueError, TypeError) as exc:
        sys.exit(f"lpenv-train: invalid configuration: {exc}")
    out_dir = Path(cfg.train.out_dir or HydraConfig.get().runtime.output_dir)
    result = train(cfg, out_dir)
    learned, paper = result["learned"], result["paper_rule"]
    print(f"{result['algo']}, {result['total_timesteps']} steps "
          f"({result['steps_per_s']:.0f} steps/s): attainment learned "
          f"{learned['attainment_mean']:.3f} vs paper rule {paper['attainment_mean']:.3f}; "
          f"return {learned['return_mean']:.3f} vs {paper['return_mean']:.3f}")
    if result["exported_timesteps"] != result["total_timesteps"]:
        print(f"exported the actor of step {result['exported_timesteps']}, the best evaluated "
              f"(the last one's return: {result['final']['return_mean']:.3f})")
    print("policy: " + result["paths"].get("published", result["paths"]["policy"]))
    log.info("%s", json.dumps(result["paths"]))
    return float(learned["return_mean"])


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
