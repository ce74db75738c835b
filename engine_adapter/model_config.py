"""The model's shape, read from a Hugging Face ``config.json`` (Qwen3-MoE or Mixtral)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from engine_adapter.errors import ConfigError

SUPPORTED_ARCHITECTURES = {
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
    "GptOssForCausalLM": "gpt_oss",
}
# Architectures the torch model runs; the others are priced by the simulator only.
EXECUTABLE_ARCHITECTURES = ("Qwen3MoeForCausalLM", "MixtralForCausalLM")
EMBEDDED_MODELS = ("qwen3-moe-cpu", "qwen3-moe-tiny", "mixtral-tiny", "qwen3-30b-a3b",
                   "gpt-oss-20b")
DEFAULT_MODEL = "qwen3-moe-cpu"


@dataclass(frozen=True)
class ModelConfig:
    """Everything the engine needs to know about a decoder-only MoE transformer."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    dense_intermediate_size: int
    norm_topk_prob: bool
    qk_norm: bool
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    sliding_window: int | None
    moe_layers: tuple[bool, ...]
    name: str = "custom"
    # Per-layer attention window where layers differ (GPT-OSS: 128 on even layers, none on odd);
    # empty: every layer uses ``sliding_window``.
    attention_windows: tuple[int | None, ...] = ()
    attention_sinks: bool = False  # one learned extra logit per head (GPT-OSS)
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                    "head_dim", "max_position_embeddings")
        for key in positive:
            if int(getattr(self, key)) <= 0:
                raise ConfigError(f"model config: {key} must be positive, got {getattr(self, key)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model config: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if any(self.moe_layers):
            if not 0 < self.top_k <= self.num_experts:
                raise ConfigError(f"model config: num_experts_per_tok ({self.top_k}) must be in "
                                  f"1..num_experts ({self.num_experts})")
            if self.expert_intermediate_size <= 0:
                raise ConfigError("model config: expert intermediate size must be positive")
        if not all(self.moe_layers) and self.dense_intermediate_size <= 0:
            raise ConfigError("model config: dense layers need a positive intermediate_size")
        if len(self.moe_layers) != self.num_layers:
            raise ConfigError("model config: moe_layers must have one entry per layer")
        if self.attention_windows and len(self.attention_windows) != self.num_layers:
            raise ConfigError("model config: layer_types must have one entry per layer")

    def window(self, layer: int) -> int | None:
        """The attention window of ``layer`` (None: full attention)."""
        return self.attention_windows[layer] if self.attention_windows else self.sliding_window

    @cached_property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Every layer's window, computed once (the cost model asks each iteration)."""
        return tuple(self.window(layer) for layer in range(self.num_layers))

    @cached_property
    def layer_kinds(self) -> dict[tuple[int | None, bool], tuple[int, ...]]:
        """Layers by what their cost depends on besides rows: (window, MoE or dense)."""
        kinds: dict[tuple[int | None, bool], list[int]] = {}
        for layer, (window, moe) in enumerate(zip(self.layer_windows, self.moe_layers)):
            kinds.setdefault((window, moe), []).append(layer)
        return {k: tuple(v) for k, v in kinds.items()}

    @property
    def executable(self) -> bool:
        """Whether the torch model runs this architecture (else: the sim backend only)."""
        return self.architecture in EXECUTABLE_ARCHITECTURES

    @property
    def arch(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    def expert_params(self) -> int:
        """Parameters of one expert (gate, up and down projections)."""
        return 3 * self.hidden_size * self.expert_intermediate_size

    def expert_bytes(self, dtype_bytes: int) -> int:
        """Bytes of one expert: the unit of the paper's expert-load traffic."""
        return self.expert_params() * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV-cache bytes one token occupies across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], name: str = "custom") -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            model_type = cfg.get("model_type")
            by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
            arch = by_type.get(model_type)
        if arch is None:
            raise ConfigError(
                f"unknown architecture {archs or cfg.get('model_type')!r}: supported are "
                f"{sorted(SUPPORTED_ARCHITECTURES)}")
        try:
            return _PARSERS[arch](cfg, name)
        except KeyError as exc:
            raise ConfigError(f"{arch} config.json is missing the key {exc}") from None

    @classmethod
    def load(cls, name_or_path: str | Path) -> ModelConfig:
        """An embedded model by name, a ``config.json`` file, or a checkpoint folder."""
        text = str(name_or_path)
        if text in EMBEDDED_MODELS:
            raw = resources.files("engine_adapter.models").joinpath(f"{text}.json").read_text()
            return cls.from_hf_dict(json.loads(raw), name=text)
        path = Path(text)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(
                f"model {text!r} is neither an embedded model {EMBEDDED_MODELS} nor a config.json "
                "or checkpoint folder")
        return cls.from_hf_dict(json.loads(path.read_text()), name=path.parent.name)


def _rope_theta(cfg: dict[str, Any]) -> float:
    scaling = cfg.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ConfigError(f"rope_scaling {scaling!r} is not supported (only default RoPE)")
    params = cfg.get("rope_parameters") or {}
    return float(cfg.get("rope_theta", params.get("rope_theta", 10000.0)))


def _qwen3_moe(cfg: dict[str, Any], name: str) -> ModelConfig:
    n_layers = int(cfg["num_hidden_layers"])
    mlp_only = set(cfg.get("mlp_only_layers") or [])
    step = int(cfg.get("decoder_sparse_step", 1))
    n_experts = int(cfg["num_experts"])
    moe = tuple(
        i not in mlp_only and n_experts > 0 and step > 0 and (i + 1) % step == 0
        for i in range(n_layers))
    heads = int(cfg["num_attention_heads"])
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
    if window is not None and int(cfg.get("max_window_layers", n_layers)) < n_layers:
        raise ConfigError("Qwen3-MoE per-layer sliding windows (max_window_layers) are not "
                          "supported")
    return ModelConfig(
        architecture="Qwen3MoeForCausalLM", name=name, hf_config=dict(cfg),
        vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
        num_layers=n_layers, num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads", heads)),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
        num_experts=n_experts, top_k=int(cfg["num_experts_per_tok"]),
        expert_intermediate_size=int(cfg["moe_intermediate_size"]),
        dense_intermediate_size=int(cfg.get("intermediate_size", 0)),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)), qk_norm=True,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=_rope_theta(cfg),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        sliding_window=int(window) if window else None, moe_layers=moe)


def _mixtral(cfg: dict[str, Any], name: str) -> ModelConfig:
    n_layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    window = cfg.get("sliding_window")
    return ModelConfig(
        architecture="MixtralForCausalLM", name=name, hf_config=dict(cfg),
        vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
        num_layers=n_layers, num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads", heads)),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
        num_experts=int(cfg["num_local_experts"]), top_k=int(cfg["num_experts_per_tok"]),
        expert_intermediate_size=int(cfg["intermediate_size"]), dense_intermediate_size=0,
        norm_topk_prob=True, qk_norm=False,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)), rope_theta=_rope_theta(cfg),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        sliding_window=int(window) if window else None, moe_layers=(True,) * n_layers)


def _gpt_oss(cfg: dict[str, Any], name: str) -> ModelConfig:
    """GPT-OSS: alternating sliding-window (``layer_types``) and full attention, attention
    sinks, 32 experts top-4. Priced by the simulator; its YaRN RoPE and clamped SwiGLU are not
    in the torch model, so RoPE scaling is read past, not checked."""
    n_layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    window = int(cfg.get("sliding_window") or 0) or None
    kinds = cfg.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                       for i in range(n_layers)]
    unknown = sorted(set(kinds) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ConfigError(f"GPT-OSS layer_types {unknown} are not known")
    params = cfg.get("rope_parameters") or {}
    return ModelConfig(
        architecture="GptOssForCausalLM", name=name, hf_config=dict(cfg),
        vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
        num_layers=n_layers, num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads", heads)),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
        num_experts=int(cfg["num_local_experts"]),
        top_k=int(cfg.get("num_experts_per_tok", cfg.get("experts_per_token", 4))),
        expert_intermediate_size=int(cfg["intermediate_size"]), dense_intermediate_size=0,
        norm_topk_prob=True, qk_norm=False,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        rope_theta=float(cfg.get("rope_theta", params.get("rope_theta", 150000.0))),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 131072)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        sliding_window=None, moe_layers=(True,) * n_layers,
        attention_windows=tuple(window if k == "sliding_attention" else None for k in kinds),
        attention_sinks=True)


_PARSERS = {"Qwen3MoeForCausalLM": _qwen3_moe, "MixtralForCausalLM": _mixtral,
            "GptOssForCausalLM": _gpt_oss}
