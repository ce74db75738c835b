"""Benchmark the engine: chunked prefill against layered prefill on the real (CPU) MoE model.

Two parts, both run on one model instance (weights shared by every engine, so it is built
once):

1. **Expert traffic of one long prompt** (the paper's traffic measurement). One random
   8,192-token prompt with ``max_tokens=1`` runs in chunked mode (chunks of 512 tokens) and in
   layered mode (prefill budget 8,192, ``PaperRule`` with G up to ``min(16, layers)``). The
   expert-load traffic of each is the sum of its iterations' ``expert_bytes``;
   ``expert_traffic_ratio`` = chunked / layered.

2. **A served workload**: a CPU-scaled equivalent of the paper's arXiv comparison.

   * Prompt lengths: inverse-CDF samples from ``ARXIV_PROMPT_DECILES`` (the deciles of the
     arXiv-summarization trace, embedded below) divided by ``PROMPT_SCALE`` = 8, clipped to
     [64, 2048] tokens (and to the model's length). The 1/8 scale keeps a run within minutes
     on a 2-core CPU.
   * Output lengths: uniform in [16, 32] tokens.
   * Arrivals: Poisson at ``--rate`` requests per second of engine (virtual) time. The default,
     4 req/s, loads the CPU without swamping it: measured on the 2-core machine, chunked
     prefill sustains about 3 req/s of these prompts (64 tokens per ~60 ms iteration) and
     layered about 6, so the baseline queues, as the paper's does at its higher rates.
   * Chunked mode: ``chunk_tokens=64``, i.e. the paper's 512 : 8,192 chunk-to-budget ratio
     (1 : 16) applied to a CPU prefill budget of 1,024 tokens.
   * Layered mode: ``prefill_budget=1024`` and ``PaperRule(max_groups=layers, unit=64)``, so
     the paper's 512-token thresholds shrink by the same factor as the chunk.
   * SLOs (``--ttft-slo``, ``--tbt-slo``), defaults 2 s and 125 ms. The CPU's speed has no
     fixed relation to 2 x H100, so they come from this machine's measured times: unloaded,
     the longest scaled prompt (~500 tokens) gets its first token in ~0.5 s, and 2 s leaves
     4x that for queueing; iterations take 10-90 ms, the range the paper's Qwen TBT SLO of
     125 ms was set for, so that one is kept. A request attains its SLO when its TTFT and
     every gap between its tokens are within them (the paper's definition).

Time is the engine's virtual clock: it advances by each iteration's measured latency, and
jumps to the next arrival when the engine is idle. Each engine first serves one small
warm-up request so that one-time costs (allocator, first touch of buffers) do not land on the
first measured iteration. The two modes' runs advance in turn, one iteration each (their
clocks are separate, so this changes no result): a burst of load from another process on a
shared machine then slows both modes alike. The JSON records the load average before and
after, so a disturbed run can be recognised. All metrics come from
``lpenv.metrics.MetricsRecorder``. On a CPU the energy is modeled, not measured (constants in
``engine_adapter/energy.py``).

Run: ``python -m scripts.bench_engine --out results/bench_engine.json --plots results``;
``--quick`` is a smoke test on the tiny model (well under a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine_adapter.config import EngineConfig
from engine_adapter.engine import Engine, build_model, max_model_len
from engine_adapter.engine import warm_up as warm_up_executor
from engine_adapter.errors import ConfigError
from engine_adapter.executor_torch import TorchExecutor
from engine_adapter.model import MoETransformer
from engine_adapter.model_config import ModelConfig
from lpenv.metrics import MetricsRecorder, tbt_gaps_of
from policies.paper_rule import PaperRule

# Deciles (0th, 10th, ..., 100th percentile) of num_prefill_tokens in
# shared/traces/arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv (28,257 requests,
# Llama-2 tokenizer; from microsoft/vidur's processed traces, MIT). Computed once with
# numpy.percentile and pasted here: the benchmark must not depend on that file at run time.
ARXIV_PROMPT_DECILES = (1, 1242, 1802, 2150, 2453, 2730, 2996, 3249, 3490, 3702, 4054)
ARXIV_TRACE = "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv"
PROMPT_SCALE = 8  # a 2-core CPU gets prompts 1/8 of the trace's lengths
ENERGY_NOTE = ("On a CPU, energy is modeled, not measured: static power x time + energy per "
               "byte x bytes moved + energy per FLOP x FLOPs, constants and sources in "
               "engine_adapter/energy.py. On a GPU with NVML it is measured.")
WARMUP_TOKENS = 32


@dataclass(frozen=True)
class TrafficSetup:
    """One long prompt, run once per mode; PaperRule's unit is the chunk size, as in the paper."""

    prompt_tokens: int
    chunk_tokens: int
    prefill_budget: int


@dataclass(frozen=True)
class WorkloadSetup:
    num_requests: int
    rate: float
    prompt_scale: int
    min_prompt: int
    max_prompt: int
    min_output: int
    max_output: int
    chunk_tokens: int
    prefill_budget: int
    paper_rule_unit: int
    ttft_slo_s: float
    tbt_slo_s: float


@dataclass(frozen=True)
class BenchRequest:
    request_id: str
    arrival_s: float  # relative to the start of the run
    prompt: list[int]
    max_tokens: int


class ModeDriver:
    """Serves a list of requests on one engine, one iteration per ``advance()``.

    Requests join at the first iteration boundary at or after their arrival (with their true
    arrival time, so TTFT includes that wait); an idle engine jumps to the next arrival.
    """

    def __init__(self, engine: Engine, requests: Sequence[BenchRequest], label: str,
                 position: int = 0) -> None:
        self.engine = engine
        self.recorder = MetricsRecorder()
        self.timeline: list[tuple[float, float]] = []  # (iteration start - t0, latency)
        self.t0 = engine.clock.now()  # warm-up already advanced the clock
        self.pending = deque(sorted(requests, key=lambda r: r.arrival_s))
        self.bar = tqdm(total=len(requests), desc=label, unit="req", position=position)

    @property
    def done(self) -> bool:
        return not self.pending and not self.engine.has_unfinished()

    def advance(self) -> None:
        engine, now = self.engine, self.engine.clock.now()
        while self.pending and self.t0 + self.pending[0].arrival_s <= now:
            req = self.pending.popleft()
            arrival = self.t0 + req.arrival_s
            engine.add_request(req.prompt, req.max_tokens, req.request_id, arrival)
            self.recorder.arrival(req.request_id, arrival, len(req.prompt), req.max_tokens)
        report = engine.step()
        if report is None:
            if not self.pending:
                raise RuntimeError(f"{self.bar.desc}: requests queued but none can be scheduled")
            engine.clock.advance_to(self.t0 + self.pending[0].arrival_s)
            return
        self.recorder.iteration(report)
        self.timeline.append((report.start_time - self.t0, report.latency_s))
        self.bar.update(len(report.finished))
        if self.done:
            self.bar.close()


def run_interleaved(drivers: dict[str, ModeDriver]) -> dict[str, ModeDriver]:
    """Advance the drivers in turn, one iteration each.

    Each engine has its own virtual clock, so the order changes no result; alternating makes
    a burst of load from other processes on this shared machine hit both modes alike instead
    of whichever happened to run during it.
    """
    while not all(d.done for d in drivers.values()):
        for driver in drivers.values():
            if not driver.done:
                driver.advance()
    return drivers


# ---- setups ---------------------------------------------------------------------------------
def traffic_setup(quick: bool) -> TrafficSetup:
    # Quick keeps the paper's 1 : 16 chunk-to-prompt ratio on the tiny model.
    return TrafficSetup(1024, 64, 1024) if quick else TrafficSetup(8192, 512, 8192)


def workload_setup(args: argparse.Namespace) -> WorkloadSetup:
    return WorkloadSetup(
        num_requests=args.requests, rate=args.rate, prompt_scale=PROMPT_SCALE,
        min_prompt=64, max_prompt=2048, min_output=16, max_output=32,
        chunk_tokens=64, prefill_budget=1024, paper_rule_unit=64,
        ttft_slo_s=args.ttft_slo, tbt_slo_s=args.tbt_slo)


# ---- engines --------------------------------------------------------------------------------
def make_engine(model: MoETransformer, base: EngineConfig, mode: str,
                policy: PaperRule | None = None, **overrides: int) -> Engine:
    """An engine of its own (scheduler, KV cache, clock) around the shared model weights."""
    config = EngineConfig(**{**asdict(base), "mode": mode, **overrides})
    executor = TorchExecutor(model, config.num_kv_blocks, config.block_size)
    return Engine(config, decide=policy, executor=executor, model_config=model.config)


def warm_up(engine: Engine) -> None:
    warm_up_executor(engine.executor, engine.config, engine.model_config, WARMUP_TOKENS)


def warm_engine_pair(model: MoETransformer, base: EngineConfig, chunk_tokens: int,
                     prefill_budget: int, policy: PaperRule) -> dict[str, Engine]:
    """The chunked baseline and layered prefill over the same model, both warmed up."""
    engines = {
        "chunked": make_engine(model, base, "chunked", chunk_tokens=chunk_tokens),
        "layered": make_engine(model, base, "layered", policy, prefill_budget=prefill_budget),
    }
    for engine in engines.values():
        warm_up(engine)
    return engines


def random_prompt(gen: torch.Generator, length: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=gen).tolist()


# ---- part 1: expert traffic of one long prompt ----------------------------------------------
def run_traffic(model: MoETransformer, base: EngineConfig, setup: TrafficSetup,
                prompt_tokens: int, seed: int) -> dict:
    mcfg = model.config
    prompt = random_prompt(torch.Generator().manual_seed(seed), prompt_tokens, mcfg.vocab_size)
    policy = PaperRule(max_groups=min(16, mcfg.num_layers), unit=setup.chunk_tokens)
    engines = warm_engine_pair(model, base, setup.chunk_tokens, setup.prefill_budget, policy)
    request = [BenchRequest("long", 0.0, prompt, 1)]
    drivers = run_interleaved({mode: ModeDriver(engine, request, f"traffic {mode}", i)
                               for i, (mode, engine) in enumerate(engines.items())})
    out: dict = {"prompt_tokens": prompt_tokens, "chunk_tokens": setup.chunk_tokens,
                 "prefill_budget": setup.prefill_budget,
                 "layered_max_groups": policy.max_groups, "paper_rule_unit": policy.unit}
    for mode, driver in drivers.items():
        summary = driver.recorder.summary()
        out[f"expert_bytes_{mode}"] = summary["expert_bytes"]
        # One request, no idle time: the span from arrival to its token is the summed latency.
        out[f"traffic_wall_s_{mode}"] = summary["sim_time_s"]
        out[f"traffic_iterations_{mode}"] = summary["iterations"]
        out[f"traffic_energy_j_{mode}"] = summary["energy_j"]
    out["expert_traffic_ratio"] = out["expert_bytes_chunked"] / out["expert_bytes_layered"]
    return out


# ---- part 2: the served workload ------------------------------------------------------------
def sample_prompt_lengths(rng: np.random.Generator, n: int, setup: WorkloadSetup,
                          max_len: int) -> np.ndarray:
    """Inverse-CDF samples from the embedded deciles (linear between them), scaled down."""
    probs = np.linspace(0.0, 1.0, len(ARXIV_PROMPT_DECILES))
    raw = np.interp(rng.random(n), probs, ARXIV_PROMPT_DECILES) / setup.prompt_scale
    upper = min(setup.max_prompt, max_len - setup.max_output)
    return np.clip(np.rint(raw), setup.min_prompt, upper).astype(int)


def sample_workload(setup: WorkloadSetup, vocab: int, max_len: int,
                    seed: int) -> list[BenchRequest]:
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed + 1)  # token ids: independent of the lengths
    lengths = sample_prompt_lengths(rng, setup.num_requests, setup, max_len)
    outputs = rng.integers(setup.min_output, setup.max_output + 1, setup.num_requests)
    arrivals = np.cumsum(rng.exponential(1.0 / setup.rate, setup.num_requests))
    return [BenchRequest(f"r{i}", float(arrivals[i]), random_prompt(gen, int(lengths[i]), vocab),
                         int(outputs[i]))
            for i in range(setup.num_requests)]


def mode_metrics(driver: ModeDriver, setup: WorkloadSetup) -> dict:
    s = driver.recorder.summary(setup.ttft_slo_s, setup.tbt_slo_s)
    keys = ("ttft_mean_s", "ttft_p50_s", "ttft_p99_s", "tbt_p50_s", "tbt_p99_s", "e2e_mean_s",
            "energy_per_token_j", "energy_j", "energy_source", "expert_bytes", "total_bytes",
            "slo_attainment", "ttft_attainment", "tbt_attainment", "requests_finished",
            "iterations", "throughput_tok_s")
    return {"iteration_latency_p50_s": s["iteration_p50_s"],
            "iteration_latency_p99_s": s["iteration_p99_s"],
            # sim_time_s spans first arrival to last token: the workload's makespan.
            "end_to_end_s": s["sim_time_s"],
            **{k: s[k] for k in keys}}


def run_workload(model: MoETransformer, base: EngineConfig, setup: WorkloadSetup,
                 seed: int) -> tuple[dict, dict[str, ModeDriver]]:
    mcfg = model.config
    requests = sample_workload(setup, mcfg.vocab_size, max_model_len(base, mcfg), seed)
    policy = PaperRule(max_groups=mcfg.num_layers, unit=setup.paper_rule_unit)
    engines = warm_engine_pair(model, base, setup.chunk_tokens, setup.prefill_budget, policy)
    drivers = run_interleaved({mode: ModeDriver(engine, requests, f"workload {mode}", i)
                               for i, (mode, engine) in enumerate(engines.items())})
    lengths = [len(r.prompt) for r in requests]
    described = {
        **asdict(setup), "seed": seed, "trace": ARXIV_TRACE,
        "prompt_deciles_unscaled": list(ARXIV_PROMPT_DECILES),
        "prompt_tokens_mean": float(np.mean(lengths)), "prompt_tokens": lengths,
        "output_tokens": [r.max_tokens for r in requests],
        "arrival_s": [round(r.arrival_s, 4) for r in requests],
        "layered_max_groups": policy.max_groups, "arrivals": "poisson",
    }
    return described, drivers


# ---- output ---------------------------------------------------------------------------------
TABLE_ROWS = (
    ("iteration p50 (ms)", "iteration_latency_p50_s", 1e3),
    ("iteration p99 (ms)", "iteration_latency_p99_s", 1e3),
    ("TTFT mean (s)", "ttft_mean_s", 1.0),
    ("TTFT p50 (s)", "ttft_p50_s", 1.0),
    ("TTFT p99 (s)", "ttft_p99_s", 1.0),
    ("TBT p99 (ms)", "tbt_p99_s", 1e3),
    ("e2e mean (s)", "e2e_mean_s", 1.0),
    ("makespan (s)", "end_to_end_s", 1.0),
    ("energy/token (mJ)", "energy_per_token_j", 1e3),
    ("expert traffic (GB)", "expert_bytes", 1e-9),
    ("SLO attainment", "slo_attainment", 1.0),
)


def format_table(result: dict) -> str:
    chunked, layered = result["modes"]["chunked"], result["modes"]["layered"]
    w = result["workload"]
    lines = [f"workload: {w['num_requests']} requests at {w['rate']} req/s, "
             f"SLO TTFT {w['ttft_slo_s']} s / TBT {w['tbt_slo_s']} s, model {result['model']} "
             f"on {result['device']}",
             f"{'metric':<22}{'chunked':>12}{'layered':>12}{'layered/chunked':>17}"]
    for label, key, scale in TABLE_ROWS:
        a, b = chunked[key] * scale, layered[key] * scale
        ratio = f"{b / a:.3f}" if a else "n/a"
        lines.append(f"{label:<22}{a:>12.4g}{b:>12.4g}{ratio:>17}")
    lines.append(
        f"expert traffic, one {result['prompt_tokens']}-token prompt: chunked (chunk "
        f"{result['chunk_tokens']}) {result['expert_bytes_chunked'] / 1e9:.3f} GB, layered "
        f"{result['expert_bytes_layered'] / 1e9:.3f} GB, ratio chunked/layered "
        f"{result['expert_traffic_ratio']:.2f}x (wall {result['traffic_wall_s_chunked']:.2f} s "
        f"vs {result['traffic_wall_s_layered']:.2f} s)")
    lines.append(f"energy source: {result['energy_source']} (modeled on a CPU: constants in "
                 "engine_adapter/energy.py)")
    return "\n".join(lines)


def _cdf(ax, values: np.ndarray, label: str) -> None:
    xs = np.sort(values)
    ax.step(xs, np.arange(1, xs.size + 1) / max(xs.size, 1), where="post", label=label)


def write_plots(runs: dict[str, ModeDriver], setup: WorkloadSetup, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on the benchmark machine
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    fig, (ax_ttft, ax_tbt) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, run in runs.items():
        recs = run.recorder.requests.values()
        _cdf(ax_ttft, np.array([r.ttft for r in recs if r.ttft is not None]), mode)
        _cdf(ax_tbt, tbt_gaps_of(recs)[0] * 1e3, mode)
    ax_ttft.axvline(setup.ttft_slo_s, color="grey", ls="--", lw=1, label="SLO")
    ax_tbt.axvline(setup.tbt_slo_s * 1e3, color="grey", ls="--", lw=1, label="SLO")
    ax_ttft.set(xlabel="TTFT (s)", ylabel="fraction of requests", title="TTFT CDF")
    ax_tbt.set(xlabel="gap between tokens (ms)", ylabel="fraction of gaps", title="TBT CDF")
    for ax in (ax_ttft, ax_tbt):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    paths = [folder / "ttft_tbt_cdf.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(11, 4))
    for mode, run in runs.items():
        t, lat = np.array(run.timeline).T if run.timeline else (np.zeros(0), np.zeros(0))
        ax.plot(t, lat * 1e3, marker=".", ms=3, lw=0.6, label=mode)
    ax.axhline(setup.tbt_slo_s * 1e3, color="grey", ls="--", lw=1, label="TBT SLO")
    ax.set(xlabel="engine time since the run started (s)", ylabel="iteration latency (ms)",
           title="Per-iteration latency", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(folder / "iteration_latency.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return [str(p) for p in paths]


# ---- entry point ----------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/bench_engine.json"))
    p.add_argument("--plots", type=Path, default=None, help="folder for PNG plots")
    p.add_argument("--model", default=None, help="default qwen3-moe-cpu (quick: qwen3-moe-tiny)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small smoke-test version")
    p.add_argument("--requests", type=int, default=None, help="workload size (default 48)")
    p.add_argument("--rate", type=float, default=4.0, help="Poisson arrival rate, req/s")
    p.add_argument("--ttft-slo", type=float, default=2.0, help="TTFT SLO, seconds")
    p.add_argument("--tbt-slo", type=float, default=0.125, help="TBT SLO, seconds")
    args = p.parse_args(argv)
    if args.requests is not None and args.requests <= 0:
        p.error("--requests must be positive")
    if min(args.rate, args.ttft_slo, args.tbt_slo) <= 0:
        p.error("--rate, --ttft-slo and --tbt-slo must be positive")
    args.model = args.model or ("qwen3-moe-tiny" if args.quick else "qwen3-moe-cpu")
    args.requests = args.requests or (6 if args.quick else 48)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """``lpenv-bench-engine``: the console script exits with ``main()``'s value, so it
    returns None (0); ``run`` returns the result. A configuration it cannot run (a device this
    machine lacks, a model the engine cannot build) exits 2 with the reason."""
    try:
        run(argv)
    except ConfigError as exc:
        print(f"lpenv-bench-engine: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def run(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    mcfg = ModelConfig.load(args.model)
    # The KV cache must hold one request of the model's full length (the engine checks).
    base = EngineConfig(model=args.model, seed=args.seed, device=args.device,
                        kv_cache_tokens=max(16384, mcfg.max_position_embeddings))
    model = build_model(base, mcfg)
    traffic = traffic_setup(args.quick)
    # A prompt plus its one output token must fit the model (the tiny model holds 1,024).
    prompt_tokens = min(traffic.prompt_tokens, mcfg.max_position_embeddings - 1)

    result: dict = {"model": args.model, "device": str(base.torch_device),
                    "torch_version": torch.__version__, "seed": args.seed, "quick": args.quick,
                    "num_layers": mcfg.num_layers, "num_experts": mcfg.num_experts,
                    "expert_bytes_each": mcfg.expert_bytes(base.torch_dtype.itemsize),
                    "torch_threads": torch.get_num_threads(),
                    "loadavg_1m_start": os.getloadavg()[0]}
    result.update(run_traffic(model, base, traffic, prompt_tokens, args.seed))
    setup = workload_setup(args)
    result["workload"], runs = run_workload(model, base, setup, args.seed)
    result["modes"] = {mode: mode_metrics(run, setup) for mode, run in runs.items()}
    result["energy_source"] = result["modes"]["layered"]["energy_source"]
    result["energy_note"] = ENERGY_NOTE
    if args.plots is not None:
        result["plots"] = write_plots(runs, setup, args.plots)
    result["loadavg_1m_end"] = os.getloadavg()[0]
    result["bench_wall_s"] = time.perf_counter() - started

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    print(f"wrote {args.out} in {result['bench_wall_s']:.1f} s")
    return result


if __name__ == "__main__":
    main()
