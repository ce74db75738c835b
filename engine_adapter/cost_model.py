"""A roofline cost model: an iteration's latency from its plan, without running it.

Each layer costs ``max(compute, memory)`` (their sum where they do not overlap, as on the CPU)
plus fixed overheads per layer, per attention call and per distinct expert (kernel launches,
or the CPU's Python loops), an expert efficiency curve in rows per expert, and its
tensor-parallel all-reduces; each iteration adds fixed costs per iteration and per row.
Compute prices dense projections, expert FFNs and attention FLOPs each at its own share of the
peak; memory prices weight and KV bytes each at its own share of the bandwidth
(``engine_adapter.hardware``). On the CPU all of it is linear in ``TERMS``, which is what
``lpenv-calibrate`` fits. Distinct experts come from the executor (the real routers) or, for
plans not run, from uniform routing: ``E (1 - (1 - k/E)^rows)``.

Used by the ``modeled`` latency option (deterministic episodes on the real engine), by
policies that estimate what a decision will cost, and by the simulator backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from mypy_extensions import mypyc_attr

from engine_adapter.executor_wrapper import ExecutorWrapper
from engine_adapter.hardware import HardwareProfile, resolve_profile
from engine_adapter.model_config import ModelConfig
from engine_adapter.plan import ExecutionResult, IterationPlan, Segment, StageWork
from engine_adapter.routing import RoutingModel
from engine_adapter.scheduler import layer_groups
from engine_adapter.traffic import (
    LayerClass,
    LayerShape,
    Traffic,
    alike_layers,
    each,
    edge_traffic,
    layer_traffic,
)

# What an iteration's latency is linear in when compute and memory do not overlap: fixed
# costs per iteration, per row (host-side work per token), per layer run, per attention call
# and per distinct expert loaded; FLOPs of each kind; weight and KV bytes.
TERMS = ("iteration", "row", "layer", "attention_call", "distinct_expert", "dense_flop",
         "expert_flop", "attention_flop", "weight_byte", "kv_byte")


def term_names(hw: HardwareProfile) -> tuple[str, ...]:
    """``TERMS`` and one term per knot of the profile's expert efficiency curve."""
    return TERMS + tuple(f"expert_rows_to_{k:g}" for k in hw.expert_curve_knots)


def coefficients(hw: HardwareProfile) -> np.ndarray:
    """Seconds per unit of each of ``term_names(hw)`` (one device)."""
    return np.array([hw.iteration_overhead_s, hw.row_overhead_s, hw.layer_overhead_s,
                     hw.attention_call_overhead_s, hw.expert_overhead_s,
                     1 / (hw.peak_flops * hw.matmul_efficiency),
                     1 / (hw.peak_flops * hw.expert_efficiency),
                     1 / (hw.peak_flops * hw.attention_efficiency),
                     1 / (hw.bandwidth * hw.weight_efficiency),
                     1 / (hw.bandwidth * hw.kv_efficiency), *hw.expert_curve_s])


def from_coefficients(base: HardwareProfile, coef: Sequence[float], **changes) -> HardwareProfile:
    """``base`` with the sum form's seconds per unit set to ``coef`` (a zero coefficient, work
    the fit found free, becomes an efficiency of 1e6)."""
    def eff(c: float, unit: float) -> float:
        return 1e6 if c <= 0 else 1.0 / (c * unit)

    c = [float(x) for x in coef]
    return replace(
        base, iteration_overhead_s=c[0], row_overhead_s=c[1], layer_overhead_s=c[2],
        attention_call_overhead_s=c[3], expert_overhead_s=c[4],
        matmul_efficiency=eff(c[5], base.peak_flops), expert_efficiency=eff(c[6], base.peak_flops),
        attention_efficiency=eff(c[7], base.peak_flops),
        weight_efficiency=eff(c[8], base.bandwidth), kv_efficiency=eff(c[9], base.bandwidth),
        expert_curve_s=tuple(c[len(TERMS):]), overlap=False, **changes)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # (compiled: copied with the env)
class CostModel:
    def __init__(self, config: ModelConfig, profile: HardwareProfile | str = "cpu-generic",
                 dtype_bytes: int = 4) -> None:
        self.config = config
        self.profile = hw = resolve_profile(profile)
        self.dtype_bytes = dtype_bytes
        # What every iteration's pricing reads: per-layer sizes by kind.
        self._shapes = {moe: LayerShape.of(config, moe, dtype_bytes) for moe in (False, True)}
        self._tensor_parallel = hw.tensor_parallel > 1
        self._decode_edge: dict[int, Traffic] = {}  # by decode batch size
        self.routing = RoutingModel(config, "uniform")  # for plans priced without routers

    def iteration_latency(self, plan: IterationPlan,
                          distinct_experts: Sequence[int | None] | None = None) -> float:
        """Latency of ``plan``; distinct experts per layer from the routers if given."""
        return self.price(plan, distinct_experts)[0]

    def price(self, plan: IterationPlan, distinct_experts: Sequence[int | None] | None = None
              ) -> tuple[float, Traffic]:
        """Latency and traffic of ``plan`` (the engine reports the traffic as it is, so it is
        counted once); distinct experts per layer from the routers, or the routing model's."""
        return self.price_groups(plan, self.groups(plan, distinct_experts))

    def groups(self, plan: IterationPlan, distinct_experts: Sequence[int | None] | None = None
               ) -> list[tuple[LayerClass, int | None, int]]:
        """Alike layers, priced once each (``traffic.alike_layers``); without routers'
        counts, distinct experts from uniform routing."""
        return alike_layers(plan, self.config, distinct_experts, self.routing)

    def price_groups(self, plan: IterationPlan, groups: Sequence[tuple[LayerClass, float | None,
                                                                        int]],
                     edge: Traffic | None = None) -> tuple[float, Traffic]:
        """Latency and traffic of ``plan`` with its layers in ``groups``."""
        latency, (eb, wb, kb, fl, xf, af) = self.price_run(plan, groups, 1, edge)
        return latency[0], Traffic(eb[0], wb[0], kb[0], fl[0], xf[0], af[0])

    def price_run(self, plan: IterationPlan, groups: Sequence[tuple[LayerClass, float | None,
                                                                     Any]],
                  iterations: int, edge: Traffic | None = None) -> tuple[list[float], Traffic]:
        """Latency and traffic of each of ``iterations`` iterations of ``plan``'s shape, with
        its layers in ``groups``: a run's (``traffic.run_classes``), whose attention stats and
        layer counts are lists over its iterations (``edge``: its embedding and
        LM-head traffic, where that changes), or one plan's (``iterations`` 1, every field one
        number). Traffic's fields come back as lists over the iterations.

        Each iteration is priced by the same scalar arithmetic, in the same order, whether
        alone or in a run: a run's iteration costs to the bit what it costs alone. (A loop,
        not array arithmetic: runs are short, a dozen iterations, and numpy's call overhead
        on arrays that short was most of the simulator's pricing.)"""
        cfg, hw, k = self.config, self.profile, iterations
        if edge is None:
            if plan.stages:
                edge = edge_traffic(cfg, plan, self.dtype_bytes)
            else:  # decode only (most iterations): the same for the same batch size
                edge = self._decode_edge.get(len(plan.decode))
                if edge is None:
                    edge = self._decode_edge[len(plan.decode)] = edge_traffic(
                        cfg, plan, self.dtype_bytes)
        rows = len(plan.decode)
        for stage in plan.stages:
            rows += stage.num_tokens
        eb, wb, kb, fl = (each(edge.expert_bytes, k), each(edge.weight_bytes, k),
                          each(edge.kv_bytes, k), each(edge.flops, k))
        xf, af = each(edge.expert_flops, k), each(edge.attention_flops, k)
        fixed = hw.iteration_overhead_s + rows * hw.row_overhead_s
        latency = [fixed + self._time(fl[i] - xf[i] - af[i], xf[i], af[i], wb[i], kb[i])
                   for i in range(k)]
        shapes, curve = self._shapes, hw.expert_curve_knots
        for c, distinct, count in groups:
            st = c.stats
            r = st.rows
            if not r:
                continue
            shape = shapes[c.moe]
            # (terms that are zero, a curve or all-reduces the profile lacks, are left out:
            # adding 0 changes no sum)
            one_fixed = (hw.layer_overhead_s + st.groups * hw.attention_call_overhead_s
                         + (distinct or 0) * hw.expert_overhead_s)
            if distinct and curve:
                one_fixed = one_fixed + hw.expert_curve_time(distinct, r * cfg.top_k / distinct)
            allreduce = (hw.allreduce_time(r, cfg.hidden_size, self.dtype_bytes)
                         if self._tensor_parallel else 0.0)
            scores, keys, counts = each(st.scores, k), each(st.keys_read, k), each(count, k)
            padded_scores, padded_keys = each(st.padded_scores, k), each(st.padded_keys, k)
            for i in range(k):
                t_eb, t_wb, t_kb, t_dense, t_xf, t_af = shape.fields(r, scores[i], keys[i],
                                                                     distinct)
                attention, kv = self._attention_work(shape, r, padded_scores[i], padded_keys[i],
                                                     t_af, t_kb)
                one = one_fixed + self._time(t_dense, t_xf, attention, t_wb, kv)
                if self._tensor_parallel:
                    one = one + allreduce
                n = counts[i]
                latency[i] += n * one
                t_fl = t_dense + t_xf + t_af
                eb[i] += t_eb * n
                wb[i] += t_wb * n
                kb[i] += t_kb * n
                fl[i] += t_fl * n
                xf[i] += t_xf * n
                af[i] += t_af * n
        return latency, Traffic(eb, wb, kb, fl, xf, af)

    def terms(self, plan: IterationPlan, distinct_experts: Sequence[int | None]) -> np.ndarray:
        """The quantities the sum form (no overlap, no tensor parallel) is linear in, in
        ``term_names(profile)`` order: ``price`` = ``terms @ coefficients(profile)``. What
        calibration fits."""
        cfg = self.config
        edge = edge_traffic(cfg, plan, self.dtype_bytes)
        knots = self.profile.expert_curve_knots
        out = np.zeros(len(TERMS) + len(knots))
        out[0] = 1.0
        out[1] = len(plan.decode) + sum(st.num_tokens for st in plan.stages)
        out[5], out[8] = edge.dense_flops, edge.weight_bytes
        for c, distinct, count in self.groups(plan, distinct_experts):
            st = c.stats
            if not st.rows:
                continue
            t = layer_traffic(cfg, c.first, st, distinct, self.dtype_bytes)
            attention, kv = self._attention_work(self._shapes[c.moe], st.rows,
                                                 st.padded_scores, st.padded_keys,
                                                 t.attention_flops, t.kv_bytes)
            out[2:len(TERMS)] += count * np.array(
                (1, st.groups, distinct or 0, t.dense_flops, t.expert_flops, attention,
                 t.weight_bytes, kv), dtype=float)
            if distinct:
                m = st.rows * cfg.top_k / distinct
                out[len(TERMS):] += [count * distinct * min(m, k) for k in knots]
        return out

    def _attention_work(self, shape: LayerShape, rows: Any, padded_scores: Any, padded_keys: Any,
                        attention_flops: Any, kv_bytes: Any) -> tuple[Any, Any]:
        """Attention FLOPs and KV bytes of an iteration's layer as the profile's kernels do
        them: exact for fused paged attention (``attention_flops`` and ``kv_bytes`` as
        counted), padded for the torch engine's plain attention (``RowStats``' padded
        fields)."""
        if not self.profile.padded_attention:
            return attention_flops, kv_bytes
        return shape.score_flops * padded_scores, (padded_keys + rows) * shape.kv_row

    def _time(self, dense_flops: float, expert_flops: float, attention_flops: float,
              weight_bytes: float, kv_bytes: float) -> float:
        """Seconds of compute and memory work: overlapped (their max) or not (their sum)."""
        hw = self.profile
        compute = hw.compute_time(dense_flops, expert_flops, attention_flops)
        memory = hw.memory_time(weight_bytes, kv_bytes)
        return max(compute, memory) if hw.overlap else compute + memory

    def predict(self, decode_context_lens: Sequence[int],
                stages: Sequence[tuple[int, int, Sequence[tuple[int, int]]]] = ()) -> float:
        """Latency of a hypothetical iteration: decode rows with these context lengths, and
        stages given as (first layer, end layer, [(start position, tokens), ...])."""
        decode = tuple(Segment("", n - 1, 1, (), True) for n in decode_context_lens)
        works = tuple(
            StageWork(i, 0, 1, lo, hi, tuple(Segment("", a, n, (), False) for a, n in segs))
            for i, (lo, hi, segs) in enumerate(stages))
        plan = IterationPlan(0, "layered", self.config.num_layers, decode, works)
        return self.iteration_latency(plan)

    def predict_batch(self, decode_context_lens: Sequence[int], pieces: Sequence[tuple[int, int]],
                      num_groups: int) -> list[float]:
        """Per-iteration latency of the G iterations a new batch of ``pieces`` (start, tokens)
        takes, with this decode batch alongside (its growth ignored)."""
        return [self.predict(decode_context_lens, [(lo, hi, pieces)])
                for lo, hi in layer_groups(self.config.num_layers, num_groups)]


@mypyc_attr(native_class=False)  # (compiled: a subclass of a Python class)
class ModeledLatency(ExecutorWrapper):
    """Wraps an executor and reports the cost model's latency instead of the measured one,
    so that episodes on the real engine are reproducible."""

    def __init__(self, inner, cost: CostModel) -> None:
        super().__init__(inner)
        self.cost = cost

    def execute(self, plan: IterationPlan) -> ExecutionResult:
        result = self.inner.execute(plan)
        result.latency_s, result.traffic = self.cost.price(plan, result.distinct_experts)
        return result
