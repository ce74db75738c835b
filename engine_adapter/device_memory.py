"""Whether a model's weights and its KV cache fit the devices a hardware profile describes.

The simulator prices whatever it is given, so without this check it would happily serve a
30B model in float32 from one 80 GB GPU. A profile with a device memory (the GPU datasheets,
or a GPU measured by ``lpenv-calibrate``) is checked when the simulator is built for it:
weights plus ``kv_cache_tokens`` (whole blocks) of KV, both split evenly over the
tensor-parallel devices, must fit in ``MEMORY_UTILIZATION`` of their memory. Profiles without
one (the CPU's) are not checked. The real engine is checked against its device's free memory
(host memory on the CPU) before it builds its weights.
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
    return _tokens_in(MEMORY_UTILIZATION * profile.memory_bytes * profile.tensor_parallel,
                      config, dtype_bytes)


def _tokens_in(usable: float, config: ModelConfig, dtype_bytes: int,
               weights_held: bool = False) -> int:
    room = usable - (0 if weights_held else model_weight_bytes(config, dtype_bytes))
    return max(0, int(room // config.kv_bytes_per_token(dtype_bytes)))


def check_fits(profile: HardwareProfile, config: ModelConfig, engine: EngineConfig) -> None:
    """Raise ``ConfigError`` where the engine's weights and KV cache cannot fit the profile's
    devices, saying how much they need, how much there is, and what would fit."""
    if not profile.memory_bytes:
        return
    tp = profile.tensor_parallel
    usable = MEMORY_UTILIZATION * profile.memory_bytes * tp
    _refuse_unless_fits(config, engine, usable,
                        f"{profile.name} holds {MEMORY_UTILIZATION:.0%} of {tp} x "
                        f"{profile.memory_bytes / 1e9:.0f} GB = {usable / 1e9:.1f} GB",
                        "or use more devices (backend.hardware=<profile>-tpN)")


def check_real_device_fits(config: ModelConfig, engine: EngineConfig, free_bytes: float,
                           device: str, weights_held: bool = False) -> None:
    """The real engine's: weights (unless this process holds them already) and KV cache in
    ``MEMORY_UTILIZATION`` of the memory ``device`` has free now, so that a model too large
    is a clear error rather than an allocator failure or the kernel's OOM killer."""
    _refuse_unless_fits(config, engine, MEMORY_UTILIZATION * free_bytes,
                        f"{device} has {free_bytes / 1e9:.1f} GB free (the engine may fill "
                        f"{MEMORY_UTILIZATION:.0%})",
                        "or simulate it (backend.name=sim)", weights_held)


def _refuse_unless_fits(config: ModelConfig, engine: EngineConfig, usable: float,
                        holder: str, more: str, weights_held: bool = False) -> None:
    dtype_bytes = engine.torch_dtype.itemsize
    fit = _tokens_in(usable, config, dtype_bytes, weights_held)
    tokens = engine.num_kv_blocks * engine.block_size
    if tokens <= fit:
        return
    weights = 0 if weights_held else model_weight_bytes(config, dtype_bytes)
    per_token = config.kv_bytes_per_token(dtype_bytes)
    need = (f"{config.name} in {engine.dtype} needs {weights / 1e9:.1f} GB of weights"
            f"{' (more than those already built)' if weights_held else ''} and "
            f"{tokens:,} KV-cache tokens x {per_token / 1e3:.1f} kB = "
            f"{tokens * per_token / 1e9:.1f} GB; {holder}")
    if fit < engine.block_size:
        raise ConfigError(f"{need}: the weights alone do not fit; use a smaller dtype {more}")
    raise ConfigError(f"{need}: set engine.kv_cache_tokens to at most {fit:,}, {more}")
