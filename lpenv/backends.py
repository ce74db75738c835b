"""Backends behind one interface: an executor for the engine core.

* ``torch``: the real MoE model (CPU or CUDA). Latency ``measured`` (host timer or CUDA events)
  or ``modeled`` (the cost model prices each plan the real model ran: reproducible episodes).
* ``sim``: the same engine core with each plan priced by the cost model (``hardware``
  profile) and distinct experts from a routing model (``routing``): no weights, no tensors;
  refused where the weights and KV cache would not fit the profile's devices
  (``engine_adapter.device_memory``).
* ``vllm`` arrives with its own issue; asking for it now is a clear error.

Built models are cached per process, so env resets and several envs share one set of weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine_adapter.config import EngineConfig
from engine_adapter.cost_model import CostModel, ModeledLatency
from engine_adapter.device_memory import check_fits
from engine_adapter.engine import build_model
from engine_adapter.executor_sim import SimExecutor
from engine_adapter.executor_torch import TorchExecutor
from engine_adapter.hardware import resolve_profile
from engine_adapter.model import MoETransformer
from engine_adapter.model_config import ModelConfig

BACKENDS = ("torch", "sim", "vllm")
LATENCIES = ("measured", "modeled")
_MODELS: dict[tuple, MoETransformer] = {}


@dataclass(frozen=True)
class BackendConfig:
    name: str = "torch"
    latency: str = "measured"
    hardware: str = "cpu-generic"  # profile (engine_adapter.hardware) for the cost model
    routing: str = "uniform"  # sim: uniform | zipf:S | empirical:PATH
    latency_noise: bool = True  # sim: draw the profile's calibrated latency scatter

    def __post_init__(self) -> None:
        if self.name not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.name!r}")
        if self.name == "vllm":
            raise NotImplementedError(
                f"backend {self.name!r} is not available yet (it comes with its own issue); "
                "use backend 'torch'")
        if self.latency not in LATENCIES:
            raise ValueError(f"latency must be one of {LATENCIES}, got {self.latency!r}")
        if not isinstance(self.latency_noise, bool):  # ("false" from a shell is truthy)
            raise ValueError(f"backend.latency_noise must be true or false, got "
                             f"{self.latency_noise!r}")
        resolve_profile(self.hardware)  # an unknown or missing profile fails here, clearly

    @property
    def deterministic(self) -> bool:
        return self.name == "sim" or self.latency == "modeled"


def shared_model(config: EngineConfig, model_config: ModelConfig) -> MoETransformer:
    key = (config.model, config.weights, config.seed, config.dtype, str(config.torch_device))
    if key not in _MODELS:
        _MODELS[key] = build_model(config, model_config)
    return _MODELS[key]


def check_memory(backend: BackendConfig, config: EngineConfig, model_config: ModelConfig
                 ) -> None:
    """Refuse, before anything runs, a simulated engine whose weights and KV cache its
    devices could not hold (``engine_adapter.device_memory``): the real engine finds out for
    itself, a simulated one must be told."""
    if backend.name == "sim":
        check_fits(resolve_profile(backend.hardware), model_config, config)


def build_executor(backend: BackendConfig, config: EngineConfig, model_config: ModelConfig):
    check_memory(backend, config, model_config)
    if backend.name == "sim":
        cost = CostModel(model_config, backend.hardware, config.torch_dtype.itemsize)
        return SimExecutor(model_config, cost, backend.routing, backend.hardware,
                           noise=backend.latency_noise, seed=config.seed)
    executor = TorchExecutor(shared_model(config, model_config), config.num_kv_blocks,
                             config.block_size)
    if backend.latency == "modeled":
        cost = CostModel(model_config, backend.hardware, config.torch_dtype.itemsize)
        return ModeledLatency(executor, cost)
    return executor
