"""Model weights: seeded random ("dummy") or Hugging Face safetensors, in HF naming both ways."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine_adapter.errors import WeightsError
from engine_adapter.model import LayerWeights, ModelWeights
from engine_adapter.model_config import ModelConfig


def allocate(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> ModelWeights:
    """Uninitialised weights of the right shapes (fused layouts, see ``LayerWeights``)."""

    def empty(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device)

    h, d = config.hidden_size, config.head_dim
    qkv_rows = (config.num_heads + 2 * config.num_kv_heads) * d
    layers = []
    for moe in config.moe_layers:
        lw = LayerWeights(
            input_norm=empty(h), post_attn_norm=empty(h), qkv=empty(qkv_rows, h),
            o_proj=empty(h, config.num_heads * d),
            q_norm=empty(d) if config.qk_norm else None,
            k_norm=empty(d) if config.qk_norm else None)
        if moe:
            e, i = config.num_experts, config.expert_intermediate_size
            lw.router = empty(e, h)
            lw.experts_gate_up = empty(e, 2 * i, h)
            lw.experts_down = empty(e, h, i)
        else:
            i = config.dense_intermediate_size
            lw.mlp_gate_up = empty(2 * i, h)
            lw.mlp_down = empty(h, i)
        layers.append(lw)
    embed = empty(config.vocab_size, h)
    lm_head = embed if config.tie_word_embeddings else empty(config.vocab_size, h)
    return ModelWeights(embed=embed, final_norm=empty(h), lm_head=lm_head, layers=layers)


def hf_views(config: ModelConfig, weights: ModelWeights) -> dict[str, torch.Tensor]:
    """Each Hugging Face parameter name mapped to the view of our tensor that holds it."""
    d, q_size = config.head_dim, config.num_heads * config.head_dim
    kv_size = config.num_kv_heads * d
    views = {"model.embed_tokens.weight": weights.embed, "model.norm.weight": weights.final_norm}
    if not config.tie_word_embeddings:
        views["lm_head.weight"] = weights.lm_head
    mixtral = config.arch == "mixtral"
    for n, lw in enumerate(weights.layers):
        p = f"model.layers.{n}."
        views[p + "input_layernorm.weight"] = lw.input_norm
        views[p + "post_attention_layernorm.weight"] = lw.post_attn_norm
        views[p + "self_attn.q_proj.weight"] = lw.qkv[:q_size]
        views[p + "self_attn.k_proj.weight"] = lw.qkv[q_size:q_size + kv_size]
        views[p + "self_attn.v_proj.weight"] = lw.qkv[q_size + kv_size:]
        views[p + "self_attn.o_proj.weight"] = lw.o_proj
        if lw.q_norm is not None:
            views[p + "self_attn.q_norm.weight"] = lw.q_norm
            views[p + "self_attn.k_norm.weight"] = lw.k_norm
        if lw.router is not None:
            i = config.expert_intermediate_size
            block = p + ("block_sparse_moe." if mixtral else "mlp.")
            views[block + "gate.weight"] = lw.router
            names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
            for e in range(config.num_experts):
                ep = f"{block}experts.{e}."
                views[ep + names[0] + ".weight"] = lw.experts_gate_up[e, :i]
                views[ep + names[1] + ".weight"] = lw.experts_gate_up[e, i:]
                views[ep + names[2] + ".weight"] = lw.experts_down[e]
        else:
            i = config.dense_intermediate_size
            views[p + "mlp.gate_proj.weight"] = lw.mlp_gate_up[:i]
            views[p + "mlp.up_proj.weight"] = lw.mlp_gate_up[i:]
            views[p + "mlp.down_proj.weight"] = lw.mlp_down
    return views


def dummy_weights(
    config: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> ModelWeights:
    """Seeded random weights: N(0, initializer_range) matrices, unit norm scales, N(0, 1)
    embeddings.

    Unit-variance embeddings keep the residual stream token-specific, so the routers stay as
    diverse as a trained model's; with 0.02 there too, deeper layers' routers collapse onto a
    few experts (measured on qwen3-moe-cpu, 512 tokens: 64, 55, 39, ... 27 distinct experts of
    64 by layer, against all 64 in every layer with unit embeddings).
    """
    weights = allocate(config, dtype, device)
    std = float(config.hf_config.get("initializer_range", 0.02))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, view in hf_views(config, weights).items():
        if name.endswith("norm.weight"):
            view.fill_(1.0)
        elif name == "model.embed_tokens.weight":
            view.copy_(torch.randn(view.shape, generator=gen, dtype=torch.float32))
        else:
            # Drawn on the CPU so a seed gives the same model on every device.
            view.copy_(torch.randn(view.shape, generator=gen, dtype=torch.float32) * std)
    return weights


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"no *.safetensors files in {folder}")
    return files


def load_safetensors(
    config: ModelConfig, folder: str | Path, dtype: torch.dtype, device: torch.device
) -> ModelWeights:
    """Weights from a Hugging Face checkpoint folder; any mismatch with the config is an error."""
    folder = Path(folder)
    weights = allocate(config, dtype, device)
    views = hf_views(config, weights)
    seen: set[str] = set()
    unexpected: list[str] = []
    for path in _safetensors_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name not in views:
                    if name == "lm_head.weight" and config.tie_word_embeddings:
                        continue
                    unexpected.append(name)
                    continue
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != tuple(views[name].shape):
                    raise WeightsError(
                        f"{path.name}: {name} has shape {tuple(tensor.shape)}, the config says "
                        f"{tuple(views[name].shape)}")
                views[name].copy_(tensor.to(dtype))
                seen.add(name)
    missing = sorted(set(views) - seen)
    if missing or unexpected:
        raise WeightsError(
            f"safetensors in {folder} do not match the {config.architecture} config: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]})")
    return weights


def save_safetensors(config: ModelConfig, weights: ModelWeights, folder: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` in Hugging Face naming."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone()
               for k, v in hf_views(config, weights).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config.hf_config, indent=2))
    return folder
