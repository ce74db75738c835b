"""Backends behind one interface: an executor for the engine core.

* ``torch``: the real MoE model (CPU or CUDA). Latency ``measured`` (host timer or CUDA events;
  ``latency_scale`` multiplies it: this machine's run at a reference machine's pace) or
  ``modeled`` (the cost model prices each plan the real model ran: reproducible episodes).
* ``sim``: the same engine core with each plan priced by the cost model (``hardware``
  profile) and distinct experts from a routing model (``routing``): no weights, no tensors;
  refused where the weights and KV cache would not fit the profile's devices
  (``engine_adapter.device_memory``), as the real engine is where they would not fit its
  device's free memory (``check_backend``).
* ``vllm``: vLLM itself, serving the chunked-prefill baseline with the same model, weights,
  workload and virtual clock (``engine_adapter.vllm_engine``; ``lpenv-eval policy=chunked
  backend.name=vllm``). It has no layered prefill, so the env and layered policies refuse it.
  Latency ``measured`` (each vLLM step's wall time, ``latency_scale`` applies) or ``modeled``
  (the cost model prices the plan of each step vLLM schedules).

Built models are cached per process, so env resets and several envs share one set of weights.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from engine_adapter.config import EngineConfig
from engine_adapter.cost_model import CostModel, ModeledLatency
from engine_adapter.device_memory import check_fits, check_real_device_fits
from engine_adapter.engine import build_model, max_model_len
from engine_adapter.errors import ConfigError
from engine_adapter.executor_sim import SimExecutor
from engine_adapter.executor_torch import TorchExecutor
from engine_adapter.hardware import HardwareProfile, ProfileExtrapolation, resolve_profile
from engine_adapter.model import MoETransformer
from engine_adapter.model_config import ModelConfig
from engine_adapter.routing import RoutingModel
from engine_adapter.scaled_latency import ScaledLatency, check_scale
from engine_adapter.vllm_engine import require_vllm

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
    # torch, measured: each measured latency times this (``engine_adapter.reference_speed``:
    # ``lpenv-calibrate --speed`` gives the one that runs at ``cpu-generic``'s pace)
    latency_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.name!r}")
        if self.latency not in LATENCIES:
            raise ValueError(f"latency must be one of {LATENCIES}, got {self.latency!r}")
        if not isinstance(self.latency_noise, bool):  # ("false" from a shell is truthy)
            raise ValueError(f"backend.latency_noise must be true or false, got "
                             f"{self.latency_noise!r}")
        scaled = check_scale(self.latency_scale, "backend.latency_scale") != 1
        if scaled and (self.name == "sim" or self.latency == "modeled"):
            raise ValueError(
                "backend.latency_scale scales measured latencies (backend.name=torch, "
                "backend.latency=measured); the simulator and modeled latency take their pace "
                "from backend.hardware")
        resolve_profile(self.hardware)  # an unknown or missing profile fails here, clearly

    @property
    def deterministic(self) -> bool:
        return self.name == "sim" or self.latency == "modeled"


def _model_key(config: EngineConfig) -> tuple:
    return config.model, config.weights, config.seed, config.dtype, str(config.torch_device)


def shared_model(config: EngineConfig, model_config: ModelConfig) -> MoETransformer:
    key = _model_key(config)
    if key not in _MODELS:
        _MODELS[key] = build_model(config, model_config)
    return _MODELS[key]


def check_backend(backend: BackendConfig, config: EngineConfig, model_config: ModelConfig
                  ) -> None:
    """Refuse, before anything is built or run, what the backend could not serve, each a
    ``ConfigError`` that says why: a KV cache that cannot hold one request; on the
    simulator, a routing model it cannot read, or weights and KV cache its devices could not
    hold (``engine_adapter.device_memory``); on vLLM, a layered engine or no vLLM to import;
    on the real engine (and vLLM), a CUDA device that is not
    there, or weights and KV cache beyond the device's free memory (host memory on the CPU:
    rather than an allocator failure or the OOM killer)."""
    max_model_len(config, model_config)
    if backend.name == "sim" or backend.latency == "modeled":
        _warn_if_extrapolated(resolve_profile(backend.hardware), model_config)
    if backend.name == "sim":
        RoutingModel(model_config, backend.routing)
        check_fits(resolve_profile(backend.hardware), model_config, config)
        return
    if backend.name == "vllm":
        if config.mode != "chunked":
            raise ConfigError(
                "vLLM has no layered prefill: backend vllm serves the chunked baseline "
                "(lpenv-eval policy=chunked backend.name=vllm); the env and layered policies "
                "run on backend torch or sim")
        require_vllm()
    try:
        device = config.present_device()
    except ConfigError as exc:
        raise ConfigError(f"{exc} (hardware=h100 and the like set it): use hardware=cpu, or "
                          "backend.name=sim to simulate the GPU") from None
    free = free_memory(device)
    if free is not None:
        held = _model_key(config) in _MODELS  # (built once per process, then shared)
        check_real_device_fits(model_config, config, free, str(device), weights_held=held)


def _warn_if_extrapolated(profile: HardwareProfile, model_config: ModelConfig) -> None:
    """A profile calibrated on one model prices another by extrapolation: its fitted
    efficiencies and overheads came from the first model's shapes. Allowed (what would this
    model cost on this machine?), but said."""
    if profile.fitted_model and profile.fitted_model != model_config.name:
        warnings.warn(
            f"hardware profile {profile.name!r} was calibrated on {profile.fitted_model}; "
            f"pricing {model_config.name} with it extrapolates its fit to other shapes (run "
            f"lpenv-calibrate --model {model_config.name} where the real engine can run it)",
            ProfileExtrapolation, stacklevel=2)  # (one place: said once per process)


def free_memory(device: torch.device) -> float | None:
    """Bytes ``device`` has free now: CUDA's own count, the kernel's MemAvailable on the
    CPU (None where neither is known)."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def build_executor(backend: BackendConfig, config: EngineConfig, model_config: ModelConfig):
    check_backend(backend, config, model_config)
    if backend.name == "vllm":
        raise ConfigError("backend vllm runs whole, not as an executor of the engine here: "
                          "engine_adapter.vllm_engine.VllmEngine")
    if backend.name == "sim":
        cost = CostModel(model_config, backend.hardware, config.torch_dtype.itemsize)
        return SimExecutor(model_config, cost, backend.routing, backend.hardware,
                           noise=backend.latency_noise, seed=config.seed)
    executor = TorchExecutor(shared_model(config, model_config), config.num_kv_blocks,
                             config.block_size)
    if backend.latency == "modeled":
        cost = CostModel(model_config, backend.hardware, config.torch_dtype.itemsize)
        return ModeledLatency(executor, cost)
    if backend.latency_scale != 1:
        return ScaledLatency(executor, backend.latency_scale)
    return executor
