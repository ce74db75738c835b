"""Calibration: run the real engine over a grid of batch shapes and fit the cost model to it.

Each grid point is a decode batch (size, context) with, beside it, one prefill batch of a given
size split into G layer groups (layered mode) or cut into chunks of a given budget (chunked
mode). Every iteration the engine runs is a sample: the plan, the distinct experts its routers
really loaded, and its measured latency.

The fit is a non-negative least squares of the cost model's sum form
(``cost_model.TERMS``: iteration, layer and distinct-expert overheads, seconds per dense,
expert and attention FLOP, per weight and KV byte) on relative error, so a 10 ms and a 1 s
iteration weigh alike. The device's peak FLOP/s and bandwidth are measured first (a large
matmul, a large copy); the fitted seconds per FLOP and per byte become efficiencies against
those peaks, so a profile reads like the datasheet ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy.optimize import nnls

from engine_adapter.config import EngineConfig
from engine_adapter.cost_model import CostModel, coefficients, from_coefficients, term_names
from engine_adapter.decision import Decision
from engine_adapter.energy import EnergyModel
from engine_adapter.energy_fit import EnergyCounter, EnergySpan, measure_span
from engine_adapter.engine import Engine
from engine_adapter.executor_wrapper import ExecutorWrapper
from engine_adapter.hardware import HardwareProfile
from engine_adapter.model_config import ModelConfig
from engine_adapter.peak_probe import PeakProbe, PeakTrace, paced_terms
from engine_adapter.plan import ExecutionResult, IterationPlan, IterationReport


@dataclass(frozen=True)
class Sample:
    plan: IterationPlan
    distinct_experts: tuple[int | None, ...]
    measured_s: float
    # The device's pace just before (``peak_probe``): when, matmul seconds, copy seconds.
    probe: tuple[float, float, float] | None = None


class RecordingExecutor(ExecutorWrapper):
    """Wraps an executor and keeps every plan it ran with the routers' distinct experts and
    the measured latency (and, given a ``PeakProbe``, its reading right before)."""

    def __init__(self, inner, probe: PeakProbe | None = None) -> None:
        super().__init__(inner)
        self.probe = probe
        self.samples: list[Sample] = []

    def execute(self, plan: IterationPlan) -> ExecutionResult:
        reading = self.probe() if self.probe is not None else None
        result = self.inner.execute(plan)
        self.samples.append(Sample(plan, tuple(result.distinct_experts), result.latency_s,
                                   reading))
        return result


@dataclass(frozen=True)
class CalibrationGrid:
    """Batch shapes to profile. Sizes are for the CPU default model; ``quick`` is a smoke test."""

    decode: tuple[tuple[int, int], ...] = ((0, 0), (1, 64), (2, 512), (4, 2048), (8, 256),
                                           (16, 1024))
    prefill: tuple[int, ...] = (16, 128, 512, 2048)
    groups: tuple[int, ...] = (1, 2, 4, 8)
    chunks: tuple[int, ...] = (64,)
    repeats: int = 2
    # Prefill batches above this go in pieces (later pieces attend to earlier ones).
    prefill_budget: int = 1024

    @classmethod
    def quick(cls) -> CalibrationGrid:
        return cls(decode=((0, 0), (4, 64)), prefill=(16, 96), groups=(1, 2), chunks=(32,),
                   repeats=1, prefill_budget=64)

    def size(self, num_layers: int) -> int:
        """Probes to run (for a progress bar)."""
        layered = len(self.prefill) * len([g for g in self.groups if g <= num_layers])
        return len(self.decode) * (layered + len(self.chunks) * len(self.prefill)) * self.repeats


def _prompt(rng: np.random.Generator, n: int, vocab: int) -> list[int]:
    return rng.integers(0, vocab, n).tolist()


def _run_until(engine: Engine, done: Callable[[], bool], decision: Callable[[], Decision | None]
               ) -> None:
    while not done():
        if engine.step(decision()) is None:
            raise RuntimeError("calibration probe stalled: nothing to run")


def _setup(engine: Engine, batch: int, context: int, rng: np.random.Generator) -> None:
    """``batch`` requests of ``context`` prompt tokens, prefilled and decoding."""
    mc = engine.model_config
    long = engine.max_model_len - context
    for _ in range(batch):
        engine.add_request(_prompt(rng, context, mc.vocab_size), long)
    s = engine.scheduler

    def fcfs() -> Decision | None:
        view = engine.decision_view()
        return Decision(1, view.fcfs_admission()) if view is not None else None

    _run_until(engine, lambda: len(s.decoding) == batch, fcfs)


def _probe(engine: Engine, prompt: list[int], num_groups: int | None) -> None:
    """One prefill of ``prompt`` (first token only) beside the running decode batch: as one
    batch of ``num_groups`` stages (layered) or in the engine's chunks (chunked: None)."""
    rid = engine.add_request(prompt, 1)

    def decide() -> Decision | None:
        # Start the probe's next piece whenever it waits and nothing else is in flight.
        view = engine.decision_view()
        if num_groups and view is not None and not view.in_flight and any(
                w.request_id == rid for w in view.waiting):
            return Decision(num_groups, (rid,))
        return None

    _run_until(engine, lambda: rid not in engine.scheduler.requests, decide)


def profile_grid(base: EngineConfig, model_config: ModelConfig, executor, grid: CalibrationGrid,
                 seed: int = 0, on_probe: Callable[[], None] | None = None,
                 peak_probe: PeakProbe | None = None) -> list[Sample]:
    """Run every grid point on ``executor`` (the real engine) and return its samples (each
    with ``peak_probe``'s reading, given one)."""
    rng = np.random.default_rng(seed)
    recorder = RecordingExecutor(executor, peak_probe)
    mc = model_config
    groups = [g for g in grid.groups if g <= mc.num_layers]
    for _ in range(grid.repeats):
        for batch, context in grid.decode:
            # layered: each probe is one prefill batch of P tokens over G stages
            executor.reset()
            engine = Engine(replace(base, mode="layered"), executor=recorder, model_config=mc,
                            decide=lambda view: Decision.wait())
            _setup(engine, batch, context, rng)
            for tokens in grid.prefill:
                for g in groups:
                    _probe(engine, _prompt(rng, tokens, mc.vocab_size), g)
                    if on_probe:
                        on_probe()
            # chunked: each probe is one prompt cut into chunks beside the decode batch
            for chunk in grid.chunks:
                executor.reset()
                # The decode batch is prefilled in large chunks (quicker, and its shapes are
                # not the point); the probes then run at the grid's chunk budget.
                engine = Engine(replace(base, mode="chunked", chunk_tokens=base.prefill_budget),
                                executor=recorder, model_config=mc)
                _setup(engine, batch, context, rng)
                engine.scheduler.chunk_tokens = chunk
                for tokens in grid.prefill:
                    _probe(engine, _prompt(rng, tokens, mc.vocab_size), None)
                    if on_probe:
                        on_probe()
    return recorder.samples


@dataclass(frozen=True)
class EnergyLoads:
    """Sustained loads for the energy fit (``energy_fit``), each held for at least ``seconds``
    of the counter's clock: decode batches (batch, context), memory-bound and more FLOPs per
    byte the larger, and back-to-back prefills of a prompt length (G = 1), compute-bound."""

    decode: tuple[tuple[int, int], ...] = ((1, 256), (8, 256), (32, 256))
    prefill: tuple[int, ...] = (256, 1024)
    seconds: float = 2.0

    def shapes(self) -> list[tuple[int, int, int]]:
        """(decode batch, its context, prompt tokens) per load."""
        return [(b, c, 0) for b, c in self.decode] + [(0, 0, p) for p in self.prefill]


def _sustain(engine: Engine, rng: np.random.Generator, batch: int, context: int, prompt: int
             ) -> Callable[[], IterationReport]:
    """One iteration of a steady load per call: ``batch`` requests of ``context`` prompt
    tokens decoding (topped up as they finish) and, with ``prompt``, a new prompt of that many
    tokens (one token out) starting whenever none is in flight."""
    mc, s = engine.model_config, engine.scheduler
    long = engine.max_model_len - context

    def step() -> IterationReport:
        while sum(r.max_tokens > 1 for r in s.requests.values()) < batch:
            engine.add_request(_prompt(rng, context, mc.vocab_size), long)
        if prompt and not s.waiting and not s.batches:
            engine.add_request(_prompt(rng, prompt, mc.vocab_size), 1)
        view = engine.decision_view()
        report = engine.step(Decision(1, view.fcfs_admission()) if view is not None else None)
        if report is None:
            raise RuntimeError("energy load stalled: nothing to run")
        return report

    return step


def energy_spans(base: EngineConfig, model_config: ModelConfig, executor,
                 counter: EnergyCounter, loads: EnergyLoads, seed: int = 0,
                 on_span: Callable[[], None] | None = None) -> list[EnergySpan]:
    """Each load on ``executor`` (the real engine), measured by ``counter``. Lengths are cut
    to what the model holds (a prompt to its length less one, a context to half of it)."""
    rng = np.random.default_rng(seed)
    spans = []
    for batch, context, prompt in loads.shapes():
        executor.reset()
        engine = Engine(replace(base, mode="layered"), executor=executor,
                        model_config=model_config, decide=lambda view: Decision.wait())
        context = min(context, engine.max_model_len // 2)
        prompt = min(prompt, engine.max_model_len - 1)
        label = f"prefill {prompt}" if prompt else f"decode {batch} x {context}"
        _setup(engine, batch, context, rng)
        spans.append(measure_span(_sustain(engine, rng, batch, context, prompt), counter,
                                  loads.seconds, label))
        if on_span:
            on_span()
    return spans


def design_matrix(cost: CostModel, samples: Sequence[Sample], trace: PeakTrace | None = None,
                  distinct: Callable[[Sample], Sequence[int | None]] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's terms (``CostModel.terms``; with ``trace``, paced: ``paced_terms``) and
    its measured latency. Distinct experts from the routers unless ``distinct`` gives others."""
    terms = np.array([cost.terms(s.plan, distinct(s) if distinct else s.distinct_experts)
                      for s in samples]).reshape(len(samples), len(term_names(cost.profile)))
    if trace is not None:
        terms = paced_terms(terms, trace.scales(samples), term_names(cost.profile))
    return terms, np.array([s.measured_s for s in samples])


def fit_coefficients(terms: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Non-negative seconds per unit of each term, minimising squared relative error."""
    a = terms / measured[:, None]
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0  # a term no sample exercised stays at zero
    coef, _ = nnls(a / scale, np.ones(len(measured)), maxiter=50 * a.shape[1])
    return coef / scale


def fit_energy(spans: Sequence[EnergySpan], name: str) -> tuple[EnergyModel, np.ndarray]:
    """The energy model (static W, J per byte, J per FLOP, none negative) that best predicts
    the spans' joules in relative terms (``fit_coefficients``, as the latency fit), and each
    span's relative error under it."""
    if len(spans) < 3:
        raise ValueError(f"fitting static power, energy per byte and per FLOP needs at least "
                         f"three spans of different loads, got {len(spans)}")
    terms = np.array([(s.seconds, s.num_bytes, s.flops) for s in spans], dtype=float)
    joules = np.array([s.joules for s in spans], dtype=float)
    if np.any(joules <= 0) or np.any(terms[:, 0] <= 0):
        raise ValueError("every span must have taken time and energy: "
                         f"{[(s.load, s.seconds, s.joules) for s in spans]}")
    relative = terms / joules[:, None]
    if np.linalg.matrix_rank(relative / relative.max(axis=0)) < 3:
        raise ValueError("the loads do not tell static power, bytes and FLOPs apart: their "
                         "mixes of time, bytes and FLOPs must differ")
    coef = fit_coefficients(terms, joules)
    model = EnergyModel(name, static_w=float(coef[0]), j_per_byte=float(coef[1]),
                        j_per_flop=float(coef[2]))
    return model, np.abs(terms @ coef - joules) / joules


def fit_profile(base: HardwareProfile, cost: CostModel, samples: Sequence[Sample], name: str,
                source: str, trace: PeakTrace | None = None) -> HardwareProfile:
    """The fitted profile, with the spread of the measurements around it; with ``trace``, each
    sample is priced at the device's pace when it ran (``peak_probe``), and the profile is the
    device at its median pace."""
    terms, measured = design_matrix(cost, samples, trace)
    coef = fit_coefficients(terms, measured)
    spread = float(np.std(np.log(measured / np.maximum(terms @ coef, 1e-12))))
    return from_coefficients(base, coef, name=name, source=source, latency_noise_sd=spread,
                             fitted_model=cost.config.name)


def predicted_latencies(cost: CostModel, samples: Sequence[Sample],
                        distinct: Callable[[Sample], Sequence[int | None]] | None = None,
                        trace: PeakTrace | None = None) -> np.ndarray:
    """The cost model's latency per sample; distinct experts from the routers unless
    ``distinct`` supplies others (a routing model's); with ``trace``, at the device's pace
    when each ran (a fitted sum-form profile's: no overlap, no tensor parallel)."""
    if trace is not None:
        if cost.profile.overlap or cost.profile.tensor_parallel > 1:
            raise ValueError(f"{cost.profile.name} is not a sum-form profile: only a fitted "
                             "one is priced at a probed pace")
        terms, _ = design_matrix(cost, samples, trace, distinct)
        return terms @ coefficients(cost.profile)
    return np.array([cost.iteration_latency(s.plan, distinct(s) if distinct else
                                            s.distinct_experts) for s in samples])


def percentage_errors(cost: CostModel, samples: Sequence[Sample],
                      distinct: Callable[[Sample], Sequence[int | None]] | None = None,
                      speed: float = 1.0, trace: PeakTrace | None = None) -> np.ndarray:
    """|predicted - measured| / measured per sample (``predicted_latencies``), each prediction
    times ``speed`` (``window_speed``: the machine's speed while they were measured) or, with
    ``trace``, at the device's probed pace."""
    measured = np.array([s.measured_s for s in samples])
    predicted = predicted_latencies(cost, samples, distinct, trace)
    return np.abs(speed * predicted - measured) / measured


def speed_ratios(cost: CostModel, samples: Sequence[Sample]) -> np.ndarray:
    """Measured over predicted latency per sample: how many times as long as ``cost``
    prices it each iteration took."""
    measured = np.array([s.measured_s for s in samples])
    return measured / predicted_latencies(cost, samples)


def window_speed(cost: CostModel, samples: Sequence[Sample]) -> float:
    """How much longer than the fit predicts the machine took while ``samples`` were measured
    (one held-out run): the median of measured over predicted latency, 1.0 where it ran at
    the fit's speed. A shared machine's speed moves by 10-20% from one minute to the next;
    ``percentage_errors(..., speed=window_speed(...))`` is then what is left of the error: how
    well the cost model tells which iterations cost more than which."""
    return float(np.median(speed_ratios(cost, samples)))


def _pass_ratios(samples: Sequence[Sample], passes: int) -> np.ndarray | None:
    """Each grid iteration's latency in the last pass over the same iteration (same shape) in
    the first; None with one pass, or where the passes' iterations do not pair up."""
    if passes < 2 or len(samples) % passes:
        return None
    n = len(samples) // passes

    def shape(s: Sample) -> tuple:
        return (len(s.plan.decode), s.plan.num_prefill_tokens,
                tuple((st.layer_start, st.layer_end) for st in s.plan.stages))

    ratios = [b.measured_s / a.measured_s for a, b in zip(samples[:n], samples[-n:])
              if shape(a) == shape(b)]
    return np.array(ratios) if len(ratios) >= n // 2 else None


def pass_drift(samples: Sequence[Sample], passes: int) -> float | None:
    """Median ratio of each grid iteration's latency in the last pass to the same iteration
    in the first: 1.0 on a steady machine (None without two passes that pair up)."""
    ratios = _pass_ratios(samples, passes)
    return None if ratios is None else float(np.median(ratios))


def measurement_scatter(samples: Sequence[Sample], passes: int) -> float | None:
    """How far one measured iteration strays when the machine measures it again minutes
    later: the median of |last / first - 1| over the same grid iterations in the last and the
    first pass, the drift between them taken out, over sqrt(2) (a pair's difference holds two
    measurements' scatter). A gauge of how steady the machine was during the calibration, not
    a floor: iterations measured back to back (a held-out episode) can agree better. None
    without two passes that pair up."""
    ratios = _pass_ratios(samples, passes)
    if ratios is None:
        return None
    return float(np.median(np.abs(ratios / np.median(ratios) - 1)) / np.sqrt(2))


def routing_observations(samples: Iterable[Sample], model_config: ModelConfig
                         ) -> list[tuple[int, int]]:
    """(rows, distinct experts) at every MoE layer invocation the samples saw."""
    from engine_adapter.executor_sim import layer_rows

    out = []
    for s in samples:
        for layer, (rows, d) in enumerate(zip(layer_rows(s.plan), s.distinct_experts)):
            if model_config.moe_layers[layer] and rows and d is not None:
                out.append((rows, d))
    return out


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_peaks(device: torch.device, dtype: torch.dtype, repeats: int = 3
                  ) -> tuple[float, float]:
    """(dense matmul FLOP/s, memory bandwidth in bytes/s) of ``device``, best of ``repeats``."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    flops = 2 * n**3 / _timed(lambda: a @ b, device, repeats)
    numel = (1 << 28 if device.type == "cuda" else 1 << 25) // a.element_size() * 4
    x = torch.empty(numel, dtype=dtype, device=device).fill_(1.0)
    y = torch.empty_like(x)
    bandwidth = 2 * x.numel() * x.element_size() / _timed(lambda: y.copy_(x), device, repeats)
    return flops, bandwidth


# Rows per distinct expert where the expert efficiency curve may bend (``HardwareProfile``).
EXPERT_CURVE_KNOTS = (2.0, 8.0, 32.0, 128.0)


def base_profile(name: str, flops: float, bandwidth: float, like: HardwareProfile,
                 memory_bytes: float = 0.0) -> HardwareProfile:
    """The measured peaks and device memory (0: not checked), on one device, with ``like``'s
    energy model: the fit's template."""
    return replace(like, name=name, peak_flops=flops, bandwidth=bandwidth,
                   memory_bytes=memory_bytes, tensor_parallel=1,
                   link_bandwidth=0.0, allreduce_latency_s=0.0, padded_attention=True,
                   expert_curve_knots=EXPERT_CURVE_KNOTS,
                   expert_curve_s=(0.0,) * len(EXPERT_CURVE_KNOTS))
