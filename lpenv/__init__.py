"""lpenv: a Gymnasium environment around a real layered-prefill MoE serving engine."""

from gymnasium.envs.registration import register, registry

ENV_ID = "lpenv/LayeredPrefill-v1"

if ENV_ID not in registry:
    # Measured iteration latencies make episodes differ run to run; pass
    # backend={"latency": "modeled"} for reproducible ones.
    register(id=ENV_ID, entry_point="lpenv.env:LayeredPrefillEnv", nondeterministic=True)

__all__ = ["ENV_ID"]
