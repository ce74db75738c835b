"""Bytes moved and FLOPs done by one iteration plan, counted from the model's shapes.

One function serves every executor: the torch executor passes the distinct experts its routers
really activated; a simulator passes those of its routing model.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine_adapter.model_config import ModelConfig
from engine_adapter.plan import IterationPlan, Segment


@dataclass(frozen=True)
class Traffic:
    expert_bytes: int  # the paper's expert-load traffic: distinct experts x bytes of one expert
    weight_bytes: int  # all weights read, experts included
    kv_bytes: int  # KV cache read and written
    flops: int


def _attended_keys(seg: Segment, window: int | None) -> tuple[int, int]:
    """(sum over the segment's queries of keys attended, keys read once for the segment)."""
    first, last = seg.start + 1, seg.end  # query at position p attends p + 1 keys
    if window is None:
        return (first + last) * seg.length // 2, seg.end
    total = sum(min(p, window) for p in range(first, last + 1))
    return total, min(seg.end, window + seg.length - 1)


def plan_traffic(
    config: ModelConfig, plan: IterationPlan, distinct_experts: list[int | None], dtype_bytes: int
) -> Traffic:
    h, d = config.hidden_size, config.head_dim
    attn_params = (config.num_heads + 2 * config.num_kv_heads) * d * h + config.num_heads * d * h
    norm_params = 2 * h + (2 * d if config.qk_norm else 0)
    kv_row = 2 * config.num_kv_heads * d * dtype_bytes  # one token's K and V in one layer
    expert_params = config.expert_params()
    dense_params = 3 * h * config.dense_intermediate_size

    expert_bytes = weight_bytes = kv_bytes = flops = 0
    for layer in range(config.num_layers):
        segs = list(plan.decode)
        segs += [s for st in plan.stages if st.covers(layer) for s in st.segments]
        rows = sum(s.length for s in segs)
        if rows == 0:
            continue
        weight_bytes += (attn_params + norm_params) * dtype_bytes
        flops += 2 * rows * attn_params
        for s in segs:
            scores, keys_read = _attended_keys(s, config.sliding_window)
            flops += 4 * config.num_heads * d * scores  # QK^T and PV
            kv_bytes += (keys_read + s.length) * kv_row  # read the context, write the new rows
        if config.moe_layers[layer]:
            n_distinct = distinct_experts[layer] or 0
            expert_bytes += n_distinct * expert_params * dtype_bytes
            weight_bytes += config.num_experts * h * dtype_bytes  # router
            flops += 2 * rows * h * config.num_experts
            flops += 2 * rows * config.top_k * expert_params
        else:
            weight_bytes += dense_params * dtype_bytes
            flops += 2 * rows * dense_params
    weight_bytes += expert_bytes
    embedded = len(plan.decode) + sum(st.num_tokens for st in plan.stages if st.is_first)
    weight_bytes += embedded * h * dtype_bytes  # embedding rows gathered
    sampled = len(plan.decode) + sum(
        1 for st in plan.stages if st.is_last for s in st.segments if s.sample)
    if sampled:
        weight_bytes += (config.vocab_size * h + h) * dtype_bytes
        flops += 2 * sampled * config.vocab_size * h
    return Traffic(expert_bytes, weight_bytes, kv_bytes, flops)
