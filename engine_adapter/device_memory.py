"""Whether a model's weights and its KV cache fit the devices a hardware profile describes.

The simulator prices whatever it is given, so without this check it would happily serve a
30B model in float32 from one 80 GB GPU. A profile with a device memory (the GPU datasheets,
or a GPU measured by ``lpenv-calibrate``) is checked when the simulator is built for it:
weights plus ``kv_cache_tokens`` (whole blocks) of KV, both split evenly over the
tensor-parallel devices, must fit in ``MEMORY_UTILIZATION`` of their memory. Profiles without
one (the CPU's: host memory) are not checked.
"""

from __future__ import annotations

from engine_adapter.config import EngineConfig
from engine_adapter.errors import ConfigError
from engine_adapter.hardware import HardwareProfile
from engine_adapter.model_config import ModelConfig
from engine_adapter.traffic import model_weight_bytes

# The share of device memory the engine may fill with weights and KV cache: vLLM's default
# ``gpu_memory_utilization``; the rest holds activations, the CUDA context and fragmentation.
MEMORY_UTILIZATION = 0.9


def kv_tokens_that_fit(profile: HardwareProfile, config: ModelConfig, dtype_bytes: int
                       ) -> int | None:
    """The most KV-cache tokens that fit beside the weights (0 where the weights alone do
    not), or None where the profile has no device memory to check."""
    if not profile.memory_bytes:
        return None
    room = (MEMORY_UTILIZATION * profile.memory_bytes * profile.tensor_parallel
            - model_weight_bytes(config, dtype_bytes))
    return max(0, int(room // config.kv_bytes_per_token(dtype_bytes)))


def check_fits(profile: HardwareProfile, config: ModelConfig, engine: EngineConfig) -> None:
    """Raise ``ConfigError`` where the engine's weights and KV cache cannot fit the devices,
    saying how much they need, how much there is, and what would fit."""
    dtype_bytes = engine.torch_dtype.itemsize
    fit = kv_tokens_that_fit(profile, config, dtype_bytes)
    tokens = engine.num_kv_blocks * engine.block_size
    if fit is None or tokens <= fit:
        return
    weights = model_weight_bytes(config, dtype_bytes)
    per_token = config.kv_bytes_per_token(dtype_bytes)
    tp = profile.tensor_parallel
    usable = MEMORY_UTILIZATION * profile.memory_bytes * tp
    need = (f"{config.name} in {engine.dtype} needs {weights / 1e9:.1f} GB of weights and "
            f"{tokens:,} KV-cache tokens x {per_token / 1e3:.1f} kB = "
            f"{tokens * per_token / 1e9:.1f} GB; {profile.name} holds "
            f"{MEMORY_UTILIZATION:.0%} of {tp} x {profile.memory_bytes / 1e9:.0f} GB = "
            f"{usable / 1e9:.1f} GB")
    if fit < engine.block_size:
        raise ConfigError(f"{need}: the weights alone do not fit; use more devices "
                          "(hardware=<profile>-tpN) or a smaller dtype")
    raise ConfigError(f"{need}: set engine.kv_cache_tokens to at most {fit:,}, or use more "
                      "devices (hardware=<profile>-tpN)")
