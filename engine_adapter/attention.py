"""Attention over a paged KV cache in plain PyTorch (runs on CPU and CUDA alike).

Rows of one layer invocation come in groups: the decode batch (one query per request,
padded and batched) and prefill segments (a run of consecutive positions of one request).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionGroup:
    """Rows ``[row_start, row_start + num_rows)`` and where their keys live.

    ``key_slots`` [B, S] are cache slots of each query's context (padding repeats slot 0),
    ``key_positions`` [B, S] their positions (-1 for padding), ``query_positions`` [B, Q].
    Decode groups have B requests and Q = 1; a prefill segment has B = 1 and Q = its length.
    """

    row_start: int
    num_rows: int
    key_slots: torch.Tensor
    key_positions: torch.Tensor
    query_positions: torch.Tensor

    def plainly_causal(self, window: int | None) -> bool:
        """One segment from position 0 with no window: SDPA's own causal path (which skips
        masked blocks) gives the same result as the explicit mask, much faster."""
        return (window is None and self.key_slots.shape[0] == 1
                and self.num_rows == self.key_slots.shape[1])

    def mask(self, window: int | None) -> torch.Tensor:
        qp = self.query_positions[:, :, None]
        kp = self.key_positions[:, None, :]
        allowed = (kp >= 0) & (kp <= qp)
        if window is not None:
            allowed &= kp > qp - window
        return allowed[:, None, :, :]  # [B, 1, Q, S]


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    groups: list[AttentionGroup],
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Attention output [N, Hq, d] for queries ``q`` [N, Hq, d] arranged in ``groups``."""
    n_kv, d = k_cache.shape[-2], k_cache.shape[-1]
    k_flat, v_flat = k_cache.view(-1, n_kv, d), v_cache.view(-1, n_kv, d)
    out = torch.empty_like(q)
    for g in groups:
        b, s = g.key_slots.shape
        qg = q[g.row_start:g.row_start + g.num_rows].view(b, -1, q.shape[1], d).transpose(1, 2)
        kg = k_flat[g.key_slots.reshape(-1)].view(b, s, n_kv, d).transpose(1, 2)
        vg = v_flat[g.key_slots.reshape(-1)].view(b, s, n_kv, d).transpose(1, 2)
        if g.plainly_causal(window):
            o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scale,
                                               enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(
                qg, kg, vg, attn_mask=g.mask(window), scale=scale, enable_gqa=True)
        out[g.row_start:g.row_start + g.num_rows] = o.transpose(1, 2).reshape(g.num_rows, -1, d)
    return out
