"""Behaviour cloning: a hand-written policy's decisions as the actor's starting point for RL.

PPO from a random actor on the env lands far apart from run to run: on make train's workload
(50,000 steps), policies reached 83-99% attainment at 3 req/s and 56-89% at 4 on the same
seeds, against the paper rule's 100% and 92%. Starting from a clone of a teacher (``train.
imitate=paper``), the runs landed at the teacher's level and stayed there.

``demonstrate`` plays the teacher on the training env (the mask PPO sees: ``ServingMask``)
and records each decision as the action that means it (``ActionCodec.encode``; a G the
action space lacks as the nearest choice, counted in ``rounded``). ``clone``
fits the actor to them by maximum likelihood: a start's G, admission level and start bit; a
wait's start bit only (a wait's G and level mean nothing, and fitting them would pull the
actor's G towards the placeholder). The critic is left to PPO.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from engine_adapter.decision import Decision
from lpenv.actions import START
from policies.env_configuration import policy_context
from policies.export import HANDWRITTEN, engine_defaults
from policies.protocol import Policy
from policies.registry import make_policy

# Demonstration episodes' seeds: apart from the evaluation seeds (1000, 1001, ...) and the
# training envs' (the run's seed and up).
DEMONSTRATION_SEED = 2000


def teacher(name: str, config: Mapping) -> Policy:
    """The hand-written policy ``name`` as lpenv-eval runs it on the env ``config`` describes
    (its engine-derived parameters from that engine); a ValueError where it cannot teach."""
    if name not in HANDWRITTEN:
        raise ValueError(f"train.imitate={name!r}: not a hand-written policy; known: "
                         f"{', '.join(HANDWRITTEN)}")
    policy = make_policy(name, policy_context(config), **engine_defaults(name, config))
    mode = config["engine"].get("mode", "layered")
    if getattr(policy, "mode", "layered") != mode:
        raise ValueError(f"train.imitate={name!r}: a {policy.mode} policy cannot teach on a "
                         f"{mode} engine")
    return policy


@dataclass(frozen=True)
class Demonstrations:
    """The teacher's decisions: what the actor saw, the mask it had and the action taken."""

    observations: np.ndarray  # (n, obs size)
    masks: np.ndarray  # (n, sum(nvec)), boolean
    actions: np.ndarray  # (n, 3)
    episodes: int
    skipped: int  # decisions the mask forbade (a wait on an idle engine): not learned from
    rounded: int = 0  # starts whose G the action space lacks, taught as the nearest choice

    def __len__(self) -> int:
        return len(self.actions)


def demonstrate(policy: Policy, env: gym.Env, seeds: Sequence[int]) -> Demonstrations:
    """``policy`` deciding every step of an episode per seed on ``env`` (a training env:
    ``policies.sb3.make_env``); each decision recorded as its action."""
    u = env.unwrapped
    codec = u.codec
    observations, masks, actions, skipped, rounded = [], [], [], 0, 0
    for seed in seeds:
        obs, _ = env.reset(seed=int(seed))
        done = False
        while not done:
            view = u.view
            if view is None:  # (ended at reset: the step ends it, whatever the action)
                action = codec.encode(Decision.wait(), view)
            else:
                decision = policy(view)
                action = codec.encode(decision, view, round_groups=True)
                rounded += bool(decision.admit) and min(
                    codec.group_choices[action[0]], view.num_layers) != decision.num_groups
                mask = env.get_wrapper_attr("action_masks")()
                if not codec.masked_components(action, mask):
                    observations.append(obs)
                    masks.append(mask)
                    actions.append(action)
                else:
                    skipped += 1
            obs, _, terminated, truncated, _ = env.step(action)
            done = terminated or truncated
    size = env.observation_space.shape[0]
    return Demonstrations(np.asarray(observations, dtype=np.float32).reshape(-1, size),
                          np.asarray(masks, dtype=bool).reshape(-1, sum(codec.nvec)),
                          np.asarray(actions, dtype=np.int64).reshape(-1, 3), len(seeds),
                          skipped, rounded)


def clone(actor_critic, demos: Demonstrations, epochs: int, batch_size: int = 64,
          seed: int = 0) -> dict:
    """Fit ``actor_critic`` (an SB3 policy: MaskablePPO's or PPO's) to ``demos`` by maximum
    likelihood with its own optimizer, in minibatches of ``batch_size`` (PPO's default: the
    start bit of the fewer starts among many waits is learned in 64-decision batches within
    30 passes, where 256-decision ones took 120); returns the last epoch's mean loss, the
    share of demonstrated decisions its deterministic actor now takes (``agreement``) and of
    those it now starts or waits at as the teacher did (``start_agreement``)."""
    import torch
    from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy

    if not len(demos):
        raise ValueError("no demonstrated decisions to clone")
    obs = torch.as_tensor(demos.observations)
    actions = torch.as_tensor(demos.actions)
    # A wait's G and level are placeholders: only its start bit is learned.
    weights = torch.ones(actions.shape, dtype=torch.float32)
    weights[actions[:, 2] != START, :2] = 0.0
    maskable = isinstance(actor_critic, MaskableActorCriticPolicy)

    def components(index):
        if maskable:
            dist = actor_critic.get_distribution(obs[index], action_masks=demos.masks[index])
            return dist.distributions
        return actor_critic.get_distribution(obs[index]).distribution

    rng = np.random.default_rng(seed)
    optimizer = actor_critic.optimizer
    actor_critic.set_training_mode(True)
    n, loss_mean = len(demos), 0.0
    for _ in range(epochs):
        total = 0.0
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            index = order[start:start + batch_size]
            log_prob = torch.stack([c.log_prob(a) for c, a in
                                    zip(components(index), actions[index].unbind(1))], dim=1)
            loss = -(weights[index] * log_prob).sum() / len(index)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        loss_mean = total / n
    actor_critic.set_training_mode(False)
    with torch.no_grad():
        mode = torch.stack([c.probs.argmax(dim=1) for c in components(np.arange(n))], dim=1)
    agree = ((mode == actions) | (weights == 0)).all(dim=1)
    start_agree = mode[:, 2] == actions[:, 2]
    return {"decisions": n, "episodes": demos.episodes, "skipped": demos.skipped,
            "rounded": demos.rounded,
            "epochs": epochs, "loss": loss_mean, "agreement": float(agree.float().mean()),
            "start_agreement": float(start_agree.float().mean())}
