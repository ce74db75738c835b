"""A decoder-only MoE transformer (Qwen3-MoE, Mixtral) whose forward runs one layer at a time.

The engine, not the model, decides which token rows pass which layer: the model only offers
``embed``, ``layer`` (one decoder layer over any rows, reading and writing the paged KV cache)
and ``logits``. Weights live in plain tensors so that the expert loop can index them directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine_adapter.attention import AttentionGroup, paged_attention
from engine_adapter.model_config import ModelConfig

# PyTorch's grouped matmul (private, in 2.13): all experts of a layer in one call on the CPU,
# in float32. CUDA's wants bfloat16 and aligned groups, so GPUs keep the loop over experts.
GROUPED_MM = hasattr(torch, "_grouped_mm")


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    post_attn_norm: torch.Tensor
    qkv: torch.Tensor  # [(Hq + 2 Hkv) * d, H]: q, k, v projections fused
    o_proj: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    # MoE layers: router [E, H], experts' gate+up [E, 2I, H] and down [E, H, I].
    router: torch.Tensor | None = None
    experts_gate_up: torch.Tensor | None = None
    experts_down: torch.Tensor | None = None
    # Dense layers: gate+up [2I, H] and down [H, I].
    mlp_gate_up: torch.Tensor | None = None
    mlp_down: torch.Tensor | None = None


@dataclass
class ModelWeights:
    embed: torch.Tensor
    final_norm: torch.Tensor
    lm_head: torch.Tensor
    layers: list[LayerWeights]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Computed in float32 and cast back, as the reference implementations do.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class RotaryEmbedding:
    """Standard (non-scaled) RoPE with the rotate-half layout of the HF implementations."""

    def __init__(self, head_dim: int, theta: float, device: torch.device) -> None:
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
        self.inv_freq = 1.0 / (theta**exponent)

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class MoEResult:
    output: torch.Tensor
    expert_tokens: torch.Tensor  # [E] tokens routed to each expert in this invocation


class MoETransformer:
    """The forward pieces of a Qwen3-MoE / Mixtral decoder over a paged KV cache."""

    def __init__(self, config: ModelConfig, weights: ModelWeights) -> None:
        self.config = config
        self.weights = weights
        self.device = weights.embed.device
        self.dtype = weights.embed.dtype
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta, self.device)
        self.scale = config.head_dim**-0.5

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.weights.embed)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        normed = rms_norm(hidden, self.weights.final_norm, self.config.rms_norm_eps)
        return normed @ self.weights.lm_head.T

    def layer(
        self,
        index: int,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        groups: list[AttentionGroup],
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run decoder layer ``index`` on ``hidden`` [N, H] (the residual stream).

        ``slots`` are the KV-cache slots the rows write; ``groups`` say how rows attend.
        Returns the new residual stream and, for MoE layers, tokens per expert.
        """
        cfg = self.config
        w = self.weights.layers[index]
        n = hidden.shape[0]
        x = rms_norm(hidden, w.input_norm, cfg.rms_norm_eps)
        qkv = x @ w.qkv.T
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        q = qkv[:, :q_size].view(n, cfg.num_heads, cfg.head_dim)
        k = qkv[:, q_size:q_size + kv_size].view(n, cfg.num_kv_heads, cfg.head_dim)
        v = qkv[:, q_size + kv_size:].view(n, cfg.num_kv_heads, cfg.head_dim)
        if w.q_norm is not None:
            q = rms_norm(q, w.q_norm, cfg.rms_norm_eps)
            k = rms_norm(k, w.k_norm, cfg.rms_norm_eps)
        cos, sin = self.rope.cos_sin(positions, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # Write this layer's KV for every row before attending: rows see their own keys.
        k_cache.view(-1, cfg.num_kv_heads, cfg.head_dim)[slots] = k
        v_cache.view(-1, cfg.num_kv_heads, cfg.head_dim)[slots] = v
        attn = paged_attention(q, k_cache, v_cache, groups, self.scale, cfg.sliding_window)
        hidden = hidden + attn.reshape(n, q_size) @ w.o_proj.T
        x = rms_norm(hidden, w.post_attn_norm, cfg.rms_norm_eps)
        if w.router is None:
            return hidden + _swiglu(x, w.mlp_gate_up, w.mlp_down), None
        moe = self.moe(x, w)
        return hidden + moe.output, moe.expert_tokens

    def moe(self, x: torch.Tensor, w: LayerWeights) -> MoEResult:
        cfg = self.config
        router_logits = x @ w.router.T
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float)
        topk_w, topk_ids = torch.topk(probs, cfg.top_k, dim=-1)
        if cfg.norm_topk_prob:
            topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True)
        topk_w = topk_w.to(x.dtype)
        flat_ids = topk_ids.reshape(-1)
        counts = torch.bincount(flat_ids, minlength=cfg.num_experts)
        # Sort (token, slot) pairs by expert so each expert reads its weights once.
        order = torch.argsort(flat_ids, stable=True)
        token_of = order // cfg.top_k
        weight_of = topk_w.reshape(-1)[order]
        out = torch.zeros_like(x)
        if GROUPED_MM and x.device.type == "cpu" and x.dtype == torch.float32:
            # Every expert's rows in two grouped matmuls: the same products as the loop below,
            # bit for bit in float32 (bfloat16 rounds differently: it keeps the loop), without
            # two dozen small ops per expert from Python.
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            gu = torch._grouped_mm(x[token_of], w.experts_gate_up.transpose(1, 2), offs=offs)
            gate, up = gu.chunk(2, dim=-1)
            y = torch._grouped_mm(F.silu(gate) * up, w.experts_down.transpose(1, 2), offs=offs)
            out.index_add_(0, token_of, y * weight_of[:, None])
            return MoEResult(out, counts)
        counts_list = counts.tolist()
        start = 0
        for expert, count in enumerate(counts_list):
            if count == 0:
                continue
            rows = token_of[start:start + count]
            y = _swiglu(x[rows], w.experts_gate_up[expert], w.experts_down[expert])
            out.index_add_(0, rows, y * weight_of[start:start + count, None])
            start += count
        return MoEResult(out, counts)


def _swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    gu = x @ gate_up.T
    gate, up = gu.chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down.T
