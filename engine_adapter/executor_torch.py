"""The torch executor: runs an IterationPlan on the real MoE model (CPU or CUDA)."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from engine_adapter.attention import AttentionGroup
from engine_adapter.model import MoETransformer
from engine_adapter.plan import ExecutionResult, IterationPlan, Segment


@dataclass
class _Rows:
    """Token rows that travel together through layers: the decode batch or one prefill batch."""

    hidden: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    groups: list[AttentionGroup]  # row_start relative to these rows


class TorchExecutor:
    """Owns the KV cache tensors and the in-flight batches' residual streams."""

    def __init__(self, model: MoETransformer, num_blocks: int, block_size: int) -> None:
        cfg = model.config
        self.model = model
        self.block_size = block_size
        self.device = model.device
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=model.dtype, device=self.device)
                        for _ in range(cfg.num_layers)]
        self.v_cache = [torch.zeros(shape, dtype=model.dtype, device=self.device)
                        for _ in range(cfg.num_layers)]
        # batch id -> rows carried between stages (hidden state = residual stream)
        self._carried: dict[int, _Rows] = {}
        self._cuda = self.device.type == "cuda"
        # Keep each sampled row's logits (for checking against a reference implementation).
        self.capture_logits = False
        self._logits: dict[str, torch.Tensor] | None = None

    def reset(self) -> None:
        """Forget in-flight batches (a new engine takes over this executor's KV cache)."""
        self._carried.clear()

    @torch.inference_mode()
    def execute(self, plan: IterationPlan) -> ExecutionResult:
        for batch_id in plan.cancelled_batches:
            self._carried.pop(batch_id, None)
        if self._cuda:
            start_ev = torch.cuda.Event(enable_timing=True)
            end_ev = torch.cuda.Event(enable_timing=True)
            start_ev.record()
        self._logits = None
        t0 = time.perf_counter()
        sampled, expert_tokens = self._run(plan)
        if self._cuda:
            end_ev.record()
            end_ev.synchronize()
            latency = start_ev.elapsed_time(end_ev) / 1e3
        else:
            latency = time.perf_counter() - t0
        return ExecutionResult(latency, sampled, expert_tokens, logits=self._logits)

    def _run(self, plan: IterationPlan) -> tuple[dict[str, int], list[list[int] | None]]:
        model = self.model
        decode = self._rows(plan.decode, embed=True) if plan.decode else None
        stage_rows = []
        for st in plan.stages:
            if st.is_first:
                stage_rows.append(self._rows(st.segments, embed=True))
            else:
                stage_rows.append(self._carried.pop(st.batch_id))
        expert_tokens: list[list[int] | None] = []
        counts_dev: list[torch.Tensor | None] = []
        for layer in range(plan.num_layers):
            active = ([decode] if decode is not None else []) + [
                rows for st, rows in zip(plan.stages, stage_rows) if st.covers(layer)]
            if not active:
                counts_dev.append(None)
                continue
            hidden, positions, slots, groups = _merge(active)
            hidden, counts = model.layer(layer, hidden, positions, slots, groups,
                                         self.k_cache[layer], self.v_cache[layer])
            counts_dev.append(counts)
            offset = 0
            for rows in active:
                n = rows.hidden.shape[0]
                rows.hidden = hidden[offset:offset + n] if len(active) > 1 else hidden
                offset += n
        expert_tokens = [c.tolist() if c is not None else None for c in counts_dev]

        # LM head only on rows that yield a token: decode rows and last-stage sample rows.
        picks, owners = [], []
        if decode is not None:
            picks.append(decode.hidden)
            owners += [s.request_id for s in plan.decode]
        for st, rows in zip(plan.stages, stage_rows):
            if st.is_last:
                idx = [_seg_last_row(st.segments, i) for i, s in enumerate(st.segments) if s.sample]
                if idx:
                    picks.append(rows.hidden[torch.tensor(idx, device=self.device)])
                    owners += [s.request_id for s in st.segments if s.sample]
            else:
                self._carried[st.batch_id] = rows
        sampled: dict[str, int] = {}
        if picks:
            logits = model.logits(torch.cat(picks))
            sampled = dict(zip(owners, logits.argmax(dim=-1).tolist()))
            self._logits = dict(zip(owners, logits.cpu())) if self.capture_logits else None
        return sampled, expert_tokens

    def _rows(self, segments: tuple[Segment, ...], embed: bool) -> _Rows:
        dev, bs = self.device, self.block_size
        positions, slots, groups = [], [], []
        decode_like = all(s.length == 1 for s in segments) and len(segments) > 1
        if decode_like:
            # One padded attention group for the whole decode batch.
            ctx = [s.end for s in segments]
            width = max(ctx)
            key_slots = torch.zeros((len(segments), width), dtype=torch.long)
            key_pos = torch.full((len(segments), width), -1, dtype=torch.long)
            for i, s in enumerate(segments):
                key_slots[i, :s.end] = _slots(s.block_table, 0, s.end, bs)
                key_pos[i, :s.end] = torch.arange(s.end)
            qpos = torch.tensor([[s.start] for s in segments])
            groups.append(AttentionGroup(0, len(segments), key_slots.to(dev), key_pos.to(dev),
                                         qpos.to(dev)))
            positions = qpos.view(-1)
            slots = torch.tensor([_slots(s.block_table, s.start, s.end, bs)[0] for s in segments])
        else:
            row = 0
            pos_parts, slot_parts = [], []
            for s in segments:
                all_slots = _slots(s.block_table, 0, s.end, bs)
                pos_parts.append(torch.arange(s.start, s.end))
                slot_parts.append(all_slots[s.start:])
                groups.append(AttentionGroup(
                    row, s.length, all_slots.view(1, -1).to(dev),
                    torch.arange(s.end).view(1, -1).to(dev),
                    torch.arange(s.start, s.end).view(1, -1).to(dev)))
                row += s.length
            positions, slots = torch.cat(pos_parts), torch.cat(slot_parts)
        ids = torch.tensor([t for s in segments for t in s.token_ids], device=dev)
        hidden = self.model.embed(ids) if embed else None
        return _Rows(hidden, positions.to(dev), slots.to(dev), groups)


def _slots(block_table: tuple[int, ...], start: int, end: int, block_size: int) -> torch.Tensor:
    pos = torch.arange(start, end)
    table = torch.tensor(block_table, dtype=torch.long)
    return table[pos // block_size] * block_size + pos % block_size


def _seg_last_row(segments: tuple[Segment, ...], index: int) -> int:
    return sum(s.length for s in segments[:index + 1]) - 1


def _merge(active: list[_Rows]):
    if len(active) == 1:
        r = active[0]
        return r.hidden, r.positions, r.slots, r.groups
    hidden = torch.cat([r.hidden for r in active])
    positions = torch.cat([r.positions for r in active])
    slots = torch.cat([r.slots for r in active])
    groups, offset = [], 0
    for r in active:
        groups += [replace(g, row_start=g.row_start + offset) for g in r.groups]
        offset += r.hidden.shape[0]
    return hidden, positions, slots, groups

