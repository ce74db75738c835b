"""The engine's configuration: one dataclass, validated when built."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine_adapter.errors import ConfigError, is_count
from engine_adapter.scheduler import MODES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    """Settings of one engine instance.

    ``weights`` is ``"dummy"`` (seeded random) or a Hugging Face checkpoint folder.
    ``prefill_budget`` caps a layered prefill batch's tokens (decode tokens not counted);
    ``chunk_tokens`` is the chunked mode's per-iteration budget (decode tokens counted).
    ``kv_cache_tokens`` sizes the paged KV cache (rounded up to whole blocks).
    ``max_batches_in_flight`` caps the prefill batches in flight at once (None: no cap); at
    the cap no batch can start, so the policy is not asked (the paper's rule runs one at a
    time).
    """

    model: str = "qwen3-moe-cpu"
    weights: str = "dummy"
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    mode: str = "layered"
    prefill_budget: int = 8192
    chunk_tokens: int = 512
    block_size: int = 16
    kv_cache_tokens: int = 65536
    max_num_seqs: int = 256
    max_model_len: int | None = None
    max_batches_in_flight: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        for key in ("prefill_budget", "chunk_tokens", "block_size", "kv_cache_tokens",
                    "max_num_seqs"):
            value = getattr(self, key)
            if not is_count(value):
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        for key in ("max_batches_in_flight", "max_model_len"):
            value = getattr(self, key)
            if value is not None and not is_count(value):
                raise ConfigError(f"{key} must be a positive integer or None, got {value!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def present_device(self) -> torch.device:
        """``torch_device``, where this machine has it; a ConfigError that says so where it
        does not (rather than torch's assertion deep in the first allocation)."""
        device = self.torch_device
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if not count:
                raise ConfigError(f"engine.device={self.device} but this machine has no CUDA "
                                  "device")
            if device.index is not None and device.index >= count:
                raise ConfigError(f"engine.device={self.device} but this machine has {count} "
                                  f"CUDA device{'s' if count > 1 else ''} (cuda:0 to "
                                  f"cuda:{count - 1})")
        return device

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.kv_cache_tokens // self.block_size)
