"""Bytes moved and FLOPs done by one iteration plan, counted from the model's shapes.

One function serves every executor: the torch executor passes the distinct experts its routers
really activated; a cost model passes those of its routing model.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

from engine_adapter.compiled import picklable
from engine_adapter.model_config import ModelConfig
from engine_adapter.plan import IterationPlan, IterationRun, Segment


class Traffic(NamedTuple):
    """Bytes moved and FLOPs done by an iteration (by each of a run's, where the fields are
    lists over its iterations: ``CostModel.price_run``). A named tuple, as ``RowStats`` and
    ``LayerClass``: several are made per iteration priced, and a frozen dataclass takes twice
    as long to make."""

    expert_bytes: Any  # the paper's expert-load traffic: distinct experts x bytes of one expert
    weight_bytes: Any  # all weights read, experts included
    kv_bytes: Any  # KV cache read and written
    flops: Any  # all of them; the two kinds below are parts of it, priced apart
    expert_flops: Any = 0  # expert FFNs
    attention_flops: Any = 0  # QK^T and PV

    # (Any, as the fields: ints, floats where distinct experts are expected values; the
    # properties and sums below are a single iteration's)
    @property
    def dense_flops(self) -> Any:
        return self.flops - self.expert_flops - self.attention_flops

    @property
    def total_bytes(self) -> Any:
        return self.weight_bytes + self.kv_bytes

    def scaled(self, n: int) -> Traffic:
        """``n`` layers' worth of this one."""
        return Traffic(self.expert_bytes * n, self.weight_bytes * n, self.kv_bytes * n,
                       self.flops * n, self.expert_flops * n, self.attention_flops * n)

    def __add__(self, other: Traffic) -> Traffic:  # type: ignore[override]  # (fields summed)
        return Traffic(self.expert_bytes + other.expert_bytes,
                       self.weight_bytes + other.weight_bytes,
                       self.kv_bytes + other.kv_bytes, self.flops + other.flops,
                       self.expert_flops + other.expert_flops,
                       self.attention_flops + other.attention_flops)


ZERO = Traffic(0, 0, 0, 0)


class RowStats(NamedTuple):
    """What a layer's attention and projections cost depends on, summed over its segments."""

    rows: Any = 0
    scores: Any = 0  # sum over queries of keys attended
    keys_read: Any = 0  # context keys read (once per segment)
    # What plain (unfused) attention does instead, as the torch engine runs it: the decode batch
    # padded to its longest context, a segment not starting at 0 with a full mask; and its
    # calls (one per segment, one for the decode batch). Fused paged kernels do neither.
    padded_scores: Any = 0
    padded_keys: Any = 0
    groups: Any = 0

    def __add__(self, other: RowStats) -> RowStats:  # type: ignore[override]  # (fields summed)
        return RowStats(self.rows + other.rows, _plus(self.scores, other.scores),
                        _plus(self.keys_read, other.keys_read),
                        _plus(self.padded_scores, other.padded_scores),
                        _plus(self.padded_keys, other.padded_keys), self.groups + other.groups)


def _plus(a: Any, b: Any) -> Any:
    """Two fields summed: numbers, or lists over a run's iterations (item by item)."""
    if type(a) is list:
        return [x + y for x, y in zip(a, b)] if type(b) is list else [x + b for x in a]
    if type(b) is list:
        return [a + y for y in b]
    return a + b


NO_ROWS = RowStats()


def _attended_keys(seg: Segment, window: int | None, sinks: bool) -> tuple[int, int]:
    """(sum over the segment's queries of keys attended, keys read once for the segment).
    A sink is one more logit per query (GPT-OSS), read from the weights, not the cache."""
    return _attended(seg.start, seg.length, window, sinks)


def _attended(start: Any, length: int, window: int | None, sinks: bool) -> tuple[Any, Any]:
    """``_attended_keys`` of ``length`` queries from ``start`` on."""
    first, last = start + 1, start + length  # query at position p attends p + 1 keys
    if window is None:
        scores, keys = (first + last) * length // 2, last
    else:
        # min(p, w) summed over p in [first, last]: a ramp up to w, then flat
        ramp_end = min(last, window)
        ramp = (first + ramp_end) * max(ramp_end - first + 1, 0) // 2
        scores = ramp + window * (last - max(first - 1, ramp_end))
        keys = min(last, window + length - 1)
    return scores + (length if sinks else 0), keys


def _padded_scores(start: Any, length: int, scores: Any, window: int | None) -> Any:
    """What plain attention computes for a segment attending ``scores`` keys: SDPA's causal
    path (exactly those) for a segment from position 0 without a window, else the full mask
    (every query against every key up to the segment's end)."""
    return scores if start == 0 and window is None else length * (start + length)


def row_stats(segments: Sequence[Segment], window: int | None, sinks: bool = False,
              decode: bool = False) -> RowStats:
    if decode:
        return _decode_stats(segments, window, sinks)
    rows = scores = keys = padded_scores = padded_keys = 0
    for seg in segments:
        sc, kr = _attended_keys(seg, window, sinks)
        rows, scores, keys = rows + seg.length, scores + sc, keys + kr
        padded_scores += _padded_scores(seg.start, seg.length, sc, window)
        padded_keys += seg.end
    return RowStats(rows, scores, keys, padded_scores, padded_keys, len(segments))


def _decode_stats(segments: Sequence[Segment], window: int | None, sinks: bool) -> RowStats:
    """``row_stats`` of a decode batch (one query per request: it attends to its whole
    context, or its window), without a call per request: it runs every iteration."""
    rows = len(segments)
    if not rows:
        return NO_ROWS
    ends = [seg.start + 1 for seg in segments]
    keys = sum(ends) if window is None else sum(e if e < window else window for e in ends)
    scores = keys + (rows if sinks else 0)
    if rows == 1:
        return RowStats(1, scores, keys, scores, keys, 1)
    width = max(ends)  # one padded call for the whole decode batch
    return RowStats(rows, scores, keys, rows * width, rows * width, 1)


def decode_run_stats(segments: Sequence[Segment], window: int | None, sinks: bool,
                     iterations: int) -> RowStats:
    """``_decode_stats`` of each of a run's iterations at once (each row one position further
    per iteration): the attention fields are lists over the iterations."""
    rows = len(segments)
    if not rows:
        return NO_ROWS
    ends = [seg.start + 1 for seg in segments]
    if window is None:
        first = sum(ends)
        keys = [first + rows * i for i in range(iterations)]
    else:
        keys = [sum(e + i if e + i < window else window for e in ends)
                for i in range(iterations)]
    scores = [n + rows for n in keys] if sinks else keys
    if rows == 1:
        return RowStats(1, scores, keys, scores, keys, 1)
    width = max(ends)
    padded = [rows * (width + i) for i in range(iterations)]
    return RowStats(rows, scores, keys, padded, padded, 1)


def chunk_run_stats(seg: Segment, window: int | None, sinks: bool, iterations: int,
                    chunk: int) -> RowStats:
    """``row_stats`` of a chunked run's prompt chunk (``seg``, then ``chunk`` positions
    further at each iteration), the attention fields lists over the iterations."""
    length = seg.length
    scores, keys, padded, ends = [], [], [], []
    for i in range(iterations):
        start = seg.start + chunk * i
        sc, kr = _attended(start, length, window, sinks)
        scores.append(sc)
        keys.append(kr)
        padded.append(_padded_scores(start, length, sc, window))
        ends.append(start + length)
    return RowStats(length, scores, keys, padded, ends, 1)


def layer_row_stats(plan: IterationPlan, config: ModelConfig) -> list[RowStats]:
    """Per layer, the rows that pass it (layers of one class share one object)."""
    classes = layer_classes(plan, config)
    return per_layer(classes, [c.stats for c in classes], plan.num_layers, config)


class LayerClass(NamedTuple):
    """Layers of one plan that cost the same: one kind (window, MoE or dense) under the same
    stages, so the same rows. ``spans`` are the [start, end) ranges holding them."""

    window: int | None
    moe: bool
    count: Any  # a list over the iterations in a run's classes (run_classes)
    first: int
    spans: tuple[tuple[int, int], ...]
    stats: RowStats


def layer_classes(plan: IterationPlan, config: ModelConfig) -> list[LayerClass]:
    """The plan's layers grouped into classes: work per class, not per layer (a 48-layer
    model under one stage is one class, two for GPT-OSS's alternating windows)."""
    stages = plan.stages
    sinks = config.attention_sinks
    if not stages:  # decode only (most iterations): one class per kind, all layers
        span = ((0, plan.num_layers),)
        return [LayerClass(window, moe, len(layers), layers[0], span,
                           _decode_stats(plan.decode, window, sinks))
                for (window, moe), layers in config.layer_kinds.items()]
    if all(st.layer_start == 0 and st.layer_end == plan.num_layers for st in stages):
        # Batches of one stage each (G = 1): one class per kind as well, their rows added
        span = ((0, plan.num_layers),)
        out = []
        for (window, moe), layers in config.layer_kinds.items():
            total = _decode_stats(plan.decode, window, sinks)
            for st in stages:
                total = total + row_stats(st.segments, window, sinks)
            out.append(LayerClass(window, moe, len(layers), layers[0], span, total))
        return out
    cuts = sorted({0, plan.num_layers, *(st.layer_start for st in stages),
                   *(st.layer_end for st in stages)})
    per_window: dict[int | None, tuple[RowStats, list[RowStats]]] = {}
    found: dict[tuple, list] = {}
    for a, b in zip(cuts, cuts[1:]):
        cover = tuple(i for i, st in enumerate(stages) if st.layer_start <= a < st.layer_end)
        for (window, moe), layers in config.layer_kinds.items():
            lo, hi = bisect_left(layers, a), bisect_left(layers, b)
            if lo == hi:
                continue
            key = (window, moe, cover)
            entry = found.get(key)
            if entry is None:
                found[key] = [hi - lo, layers[lo], [(a, b)], window, moe, cover]
            else:
                entry[0] += hi - lo
                entry[2].append((a, b))
    # Stages covered, then kind: the order the latency is summed in, the same for a run
    # (``run_classes``) as for its iterations one by one.
    rank = {kind: i for i, kind in enumerate(config.layer_kinds)}
    out = []
    for count, first, spans, window, moe, cover in sorted(
            found.values(), key=lambda e: (e[5], rank[(e[3], e[4])])):
        if window not in per_window:
            per_window[window] = (row_stats(plan.decode, window, sinks, decode=True),
                                  [row_stats(st.segments, window, sinks) for st in stages])
        decode, staged = per_window[window]
        total = decode
        for i in cover:
            total = total + staged[i]
        out.append(LayerClass(window, moe, count, first, tuple(spans), total))
    return out


def run_classes(run: IterationRun, config: ModelConfig, iterations: int) -> list[LayerClass]:
    """``layer_classes`` of a run's first ``iterations`` iterations at once, in its order: per
    layer kind, the layers outside the batch's stage (decode rows only), then those in it
    (its rows too), with layer counts and attention stats as lists over the iterations."""
    sinks = config.attention_sinks
    kinds = config.layer_kinds
    decode = {window: decode_run_stats(run.decode, window, sinks, iterations)
              for window, _ in kinds}
    if not run.stages:
        return [LayerClass(window, moe, len(layers), layers[0], (), decode[window])
                for (window, moe), layers in kinds.items()]
    st = run.stages[0]
    if run.chunk:  # every layer, each iteration's chunk beside the decode rows
        (seg,) = st.segments
        return [LayerClass(window, moe, len(layers), layers[0], (), decode[window]
                           + chunk_run_stats(seg, window, sinks, iterations, run.chunk))
                for (window, moe), layers in kinds.items()]
    bounds = run.stage_bounds[st.stage:st.stage + iterations]
    outside, inside = [], []
    for (window, moe), layers in kinds.items():
        covered = [bisect_left(layers, hi) - bisect_left(layers, lo) for lo, hi in bounds]
        outside.append(LayerClass(window, moe, [len(layers) - n for n in covered], layers[0],
                                  (), decode[window]))
        inside.append(LayerClass(window, moe, covered, layers[0], (),
                                 decode[window] + row_stats(st.segments, window, sinks)))
    return outside + inside


def each(value: Any, iterations: int) -> list:
    """A field's value in each of a run's ``iterations``: a list's items, one per iteration,
    or the one value ``iterations`` times (a new list either way)."""
    if isinstance(value, list):
        return list(value)
    return [value] * iterations


def per_layer(classes: Sequence[LayerClass], values: Sequence, num_layers: int,
              config: ModelConfig) -> list:
    """One value per class spread back to one per layer."""
    out: list = [None] * num_layers
    for c, value in zip(classes, values):
        layers = config.layer_kinds[(c.window, c.moe)]
        for a, b in c.spans:
            if len(layers) == num_layers:  # one kind: the span is all of this class
                out[a:b] = [value] * (b - a)
            else:
                for layer in layers[bisect_left(layers, a):bisect_left(layers, b)]:
                    out[layer] = value
    return out


def per_class(classes: Sequence[LayerClass], values: Sequence, config: ModelConfig
              ) -> list[list]:
    """Per-layer values gathered per class (the inverse of ``per_layer``)."""
    out = []
    for c in classes:
        layers = config.layer_kinds[(c.window, c.moe)]
        out.append([values[layer] for a, b in c.spans
                    for layer in layers[bisect_left(layers, a):bisect_left(layers, b)]])
    return out


@dataclass(frozen=True)
class LayerShape:
    """What one decoder layer of a kind (MoE or dense) reads and computes, per unit of the
    rows passing it: the one formula ``layer_traffic`` and the cost model's pricing share."""

    weight_bytes: int  # attention, norms, and the router or the dense MLP
    dense_row_flops: int  # projections and the router or the dense MLP, per row
    expert_row_flops: int  # expert FFNs per row (its top-k experts)
    expert_bytes: int  # one expert's weights
    score_flops: int  # QK^T and PV per attended key
    kv_row: int  # one token's K and V

    @classmethod
    @lru_cache(maxsize=64)
    def of(cls, config: ModelConfig, moe: bool, dtype_bytes: int) -> LayerShape:
        h, d = config.hidden_size, config.head_dim
        heads, kv_heads = config.num_heads, config.num_kv_heads
        attn_params = (heads + 2 * kv_heads) * d * h + heads * d * h  # QKV and output
        norm_params = 2 * h + (2 * d if config.qk_norm else 0)
        if moe:
            expert_params = config.expert_params()
            extra_params = config.num_experts * h  # the router
            return cls((attn_params + norm_params + extra_params) * dtype_bytes,
                       2 * attn_params + 2 * extra_params, 2 * config.top_k * expert_params,
                       expert_params * dtype_bytes, 4 * heads * d, 2 * kv_heads * d * dtype_bytes)
        dense_params = 3 * h * config.dense_intermediate_size
        return cls((attn_params + norm_params + dense_params) * dtype_bytes,
                   2 * attn_params + 2 * dense_params, 0, 0, 4 * heads * d,
                   2 * kv_heads * d * dtype_bytes)

    def fields(self, rows: int, scores, keys_read, distinct_experts: float | None) -> tuple:
        """(expert bytes, weight bytes, KV bytes, dense FLOPs, expert FLOPs, attention FLOPs)
        of ``rows`` rows attending ``scores`` keys in all, reading ``keys_read`` context keys
        (an iteration's)."""
        expert_bytes = (distinct_experts or 0) * self.expert_bytes
        return (expert_bytes, self.weight_bytes + expert_bytes, (keys_read + rows) * self.kv_row,
                rows * self.dense_row_flops, rows * self.expert_row_flops,
                self.score_flops * scores)


def model_weight_bytes(config: ModelConfig, dtype_bytes: int) -> int:
    """All of a model's weights: the embedding, the LM head (unless tied to it), the final
    norm and every layer's (``LayerShape``), each MoE layer's experts included."""
    edge = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    total = (edge + config.hidden_size) * dtype_bytes
    for moe in config.moe_layers:
        shape = LayerShape.of(config, moe, dtype_bytes)
        total += shape.weight_bytes + (config.num_experts * shape.expert_bytes if moe else 0)
    return total


def layer_traffic(config: ModelConfig, layer: int, stats: RowStats,
                  distinct_experts: int | None, dtype_bytes: int) -> Traffic:
    """One decoder layer run over rows summed in ``stats`` (nothing if there are none)."""
    if stats.rows == 0:
        return ZERO
    shape = LayerShape.of(config, config.moe_layers[layer], dtype_bytes)
    eb, wb, kb, dense, xf, af = shape.fields(stats.rows, stats.scores, stats.keys_read,
                                             distinct_experts)
    return Traffic(eb, wb, kb, dense + xf + af, xf, af)


def edge_traffic(config: ModelConfig, plan: IterationPlan, dtype_bytes: int) -> Traffic:
    """Embedding rows gathered and the LM head (on sampled rows only)."""
    embedded = len(plan.decode) + sum(st.num_tokens for st in plan.stages if st.is_first)
    sampled = len(plan.decode) + sum(
        1 for st in plan.stages if st.is_last for s in st.segments if s.sample)
    return edge_traffic_of(config, embedded, sampled, dtype_bytes)


def edge_traffic_of(config: ModelConfig, embedded: int, sampled: int, dtype_bytes: int
                    ) -> Traffic:
    """``edge_traffic`` of ``embedded`` rows and ``sampled`` ones: the LM head's weights are
    read where any row is sampled."""
    h, vocab = config.hidden_size, config.vocab_size
    head = (vocab * h + h) * dtype_bytes
    return Traffic(0, embedded * h * dtype_bytes + (sampled > 0) * head, 0,
                   2 * sampled * vocab * h)


def alike_layers(plan: IterationPlan, config: ModelConfig,
                 distinct_experts: Sequence[int | None] | None = None, routing=None
                 ) -> list[tuple[LayerClass, int | None, int]]:
    """(layer class, distinct experts, number of layers): alike layers, counted once each.
    Distinct experts per layer come from the routers (layers of one class may differ, which
    splits it) or, if None, from ``routing.distinct(rows)`` per class."""
    classes = layer_classes(plan, config)
    if distinct_experts is None:
        return [(c, routing.distinct(c.stats.rows) if c.moe and c.stats.rows else None,
                 c.count) for c in classes]
    out = []
    for c, hits in zip(classes, per_class(classes, distinct_experts, config)):
        out += [(c, d, n) for d, n in Counter(hits).items()]
    return out


def plan_traffic(
    config: ModelConfig, plan: IterationPlan, distinct_experts: Sequence[int | None],
    dtype_bytes: int
) -> Traffic:
    total = edge_traffic(config, plan, dtype_bytes)
    for c, distinct, count in alike_layers(plan, config, distinct_experts):
        if c.stats.rows:
            total = total + layer_traffic(config, c.first, c.stats, distinct,
                                          dtype_bytes).scaled(count)
    return total

picklable(LayerShape)
