"""lpenv: a Gymnasium environment around a real layered-prefill MoE serving engine."""

from gymnasium.envs.registration import register, registry

import engine_adapter  # noqa: F401  (its guard decides, before any module of ours loads, whether the compiled build runs)

ENV_ID = "lpenv/LayeredPrefill-v1"

if ENV_ID not in registry:
    # Measured iteration latencies make episodes differ run to run; pass
    # backend={"latency": "modeled"} for reproducible ones.
    register(id=ENV_ID, entry_point="lpenv.env:LayeredPrefillEnv", nondeterministic=True)

__all__ = ["ENV_ID"]
