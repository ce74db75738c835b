"""Play one env episode with the trivial policy the sim tests share: the first G choice, the
fullest admission, start whenever the mask allows."""

from __future__ import annotations


def play_trivially(env, seed: int) -> dict:
    """Run ``env`` from ``reset(seed)`` to the end; the last step's ``info``."""
    env.reset(seed=seed)
    done = False
    while not done:
        mask = env.unwrapped.action_masks()
        action = [0, env.unwrapped.codec.admission_levels - 1, int(mask[-1])]
        _, _, terminated, truncated, info = env.step(action)
        done = terminated or truncated
    return info
