"""lpenv-eval: evaluate one policy on one workload on the engine's virtual clock.

Writes into the Hydra run directory (``outputs/eval/<date>/<time>``, or one folder per job of a
multirun under ``multirun/eval/<date>/<time>``):

* ``summary.json``: the run's identity (policy, engine, model, workload, rate, SLOs, seed) and
  every figure of ``lpenv.metrics.MetricsRecorder.summary`` (attainment, TTFT, TBT, E2E,
  throughput, energy, bytes, virtual time) plus ``wall_time_s``, the host time of the episode;
* ``requests.csv``: one row per request: arrival, first token, TTFT, prompt and output
  lengths, whether it attained its SLO, and every token's time (space-separated).

Examples::

    lpenv-eval                                     # the paper rule, arxiv4k at 4 req/s, CPU
    lpenv-eval policy=chunked workload.rate=3
    lpenv-eval model=qwen3-moe-tiny backend.latency=modeled
    lpenv-eval -m policy=fixed policy.groups=1,2,4,8 workload.rate=2,4,6  # joblib, parallel
    lpenv-sweep-report multirun/eval/<date>/<time>

The run goes through ``lpenv.episode.Episode``, the same driver as the env: the engine in the
policy's mode, the executor from ``lpenv.backends``, a virtual clock, the workload drawn from
``seed``. Every metric comes from the episode's ``MetricsRecorder``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from tqdm import tqdm

from engine_adapter.clock import VirtualClock
from engine_adapter.config import EngineConfig
from engine_adapter.cost_model import CostModel
from engine_adapter.engine import Engine, warm_up
from engine_adapter.errors import ConfigError
from engine_adapter.model_config import ModelConfig
from lpenv.backends import BackendConfig, build_executor, check_backend
from lpenv.config_schema import (
    EvalConfig,
    check_top_level,
    policy_params,
    register_configs,
    to_dataclass,
)
from lpenv.episode import Episode, draw_prompt
from lpenv.metrics import MetricsRecorder
from lpenv.reward import SLO, RewardConfig
from lpenv.workload import RequestSpec, WorkloadConfig, generate
from policies.protocol import Policy, PolicyContext
from policies.registry import make_policy

# An absolute path: the entry point finds conf/ from any working directory.
CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"
register_configs()
log = logging.getLogger("lpenv.eval")

# What every summary.json holds (sweep reports and tests rely on these).
SUMMARY_FIELDS = (
    "policy", "engine", "model", "workload", "rate", "requests_total", "requests_finished",
    "requests_rejected", "slo_attainment", "ttft_attainment", "tbt_attainment", "ttft_mean_s",
    "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tbt_p50_s", "tbt_p99_s", "e2e_mean_s",
    "throughput_tok_s", "energy_j", "energy_per_token_j", "energy_source", "expert_bytes",
    "total_bytes", "sim_time_s", "wall_time_s")
CSV_COLUMNS = ("request_id", "arrival_s", "first_token_s", "ttft_s", "prompt_tokens",
               "output_tokens", "generated_tokens", "finished", "rejected", "attained",
               "token_times_s")


class ConfigProblem(ValueError):
    """A configuration that composes but cannot be built (the message says what and where)."""


@dataclass
class Setup:
    """Everything one evaluation is built from, checked."""

    engine: EngineConfig
    model: ModelConfig
    workload: WorkloadConfig
    slo: SLO
    reward: RewardConfig
    backend: BackendConfig
    policy: Policy
    label: str


def policy_label(cfg: DictConfig, overrides: Sequence[str] = ()) -> str:
    """``policy.label`` if set, else the policy's name and its ``policy.*`` overrides (but a
    learned policy's path)."""
    if cfg.policy.label:
        return str(cfg.policy.label)
    params = [o.split(".", 1)[1] for o in overrides
              if o.startswith("policy.") and o.split("=")[0] not in ("policy.label", "policy.path")]
    return " ".join([str(cfg.policy.name), *params])


def build(cfg: DictConfig, overrides: Sequence[str] = ()) -> Setup:
    """The dataclasses and the policy; config mistakes raise ConfigProblem naming the key."""
    try:
        check_top_level(cfg, EvalConfig)
        if cfg.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {cfg.seed}")
        if cfg.horizon_s is not None and not cfg.horizon_s > 0:
            raise ValueError(f"horizon_s must be positive or null, got {cfg.horizon_s}")
        parts = {name: to_dataclass(name, cfg[name])
                 for name in ("workload", "slo", "reward", "backend")}
        if parts["workload"].rate_max is not None:
            raise ValueError("workload.rate_max draws each training episode's rate; an "
                             "evaluation runs one rate: sweep workload.rate=1,2,3 instead")
        engine, model, policy = engine_and_policy(cfg, parts["slo"], parts["backend"])
    except (ConfigError, ValueError, TypeError, FileNotFoundError) as exc:
        raise ConfigProblem(str(exc)) from exc
    label = policy_label(cfg, overrides)
    if parts["backend"].name == "vllm" and not cfg.policy.label:
        label += " (vLLM)"  # (beside the engine's own chunked runs in a report)
    return Setup(engine, model, parts["workload"], parts["slo"], parts["reward"],
                 parts["backend"], policy, label)


def engine_and_policy(cfg: DictConfig, slo: SLO, backend: BackendConfig
                      ) -> tuple[EngineConfig, ModelConfig, Policy]:
    """The policy of ``cfg.policy`` and the engine configuration it runs in (its mode, a
    chunked policy's token budget, its cap on batches in flight), checked against
    ``backend`` (``lpenv-eval`` and ``lpenv-serve``)."""
    engine = to_dataclass("engine", cfg.engine)
    model = ModelConfig.load(engine.model)
    context = PolicyContext(model, slo.ttft_s, slo.tbt_s, backend.hardware,
                            engine.torch_dtype.itemsize, engine=engine)
    policy = make_policy(str(cfg.policy.name), context, **policy_params(cfg.policy))
    # The engine runs in the policy's mode; a chunked policy brings its token budget, one
    # that keeps to a number of batches in flight that cap.
    caps = [c for c in (getattr(policy, "max_in_flight", None),
                        engine.max_batches_in_flight) if c is not None]
    mode_settings: dict[str, Any] = {"mode": policy.mode,
                                     "max_batches_in_flight": min(caps, default=None)}
    if policy.mode == "chunked":
        mode_settings["chunk_tokens"] = policy.chunk_tokens
    engine = EngineConfig(**{**asdict(engine), **mode_settings})
    check_backend(backend, engine, model)
    return engine, model, policy


def run_episode(cfg: DictConfig, setup: Setup) -> tuple[dict, MetricsRecorder]:
    """Serve the workload (on vLLM where the backend is ``vllm``); the summary and the
    recorder its metrics came from."""
    if setup.backend.name == "vllm":
        return run_vllm(cfg, setup)
    executor = build_executor(setup.backend, setup.engine, setup.model)
    if hasattr(executor, "reseed"):  # the simulator's latency noise follows the run's seed
        executor.reseed(int(cfg.seed))
    if cfg.warmup and not setup.backend.deterministic:
        warm_up(executor, setup.engine, setup.model)
    engine = Engine(setup.engine, executor=executor, clock=VirtualClock(),
                    model_config=setup.model)
    rng = np.random.default_rng(cfg.seed)
    requests = generate(setup.workload, rng)
    bar = progress(cfg, setup, len(requests))

    def on_iteration(report) -> None:
        bar.update(len(report.finished))

    episode = Episode(engine, requests, setup.slo, setup.reward, rng, cfg.horizon_s,
                      on_iteration=on_iteration, measure_from_s=setup.workload.warmup_s)
    start = time.perf_counter()
    metrics = episode.run(setup.policy)
    wall = time.perf_counter() - start
    bar.close()
    return summary_of(cfg, setup, requests, metrics, wall), episode.recorder


def run_vllm(cfg: DictConfig, setup: Setup) -> tuple[dict, MetricsRecorder]:
    """The workload on vLLM (``engine_adapter.vllm_engine``): the same requests and prompts
    as the episode draws from the seed, the same clock and metrics."""
    from engine_adapter.vllm_engine import VllmEngine

    server = VllmEngine(setup.engine, setup.model)
    cost = None
    if setup.backend.latency == "modeled":  # (vLLM's schedule, priced as the engine's plans)
        cost = CostModel(setup.model, setup.backend.hardware, setup.engine.torch_dtype.itemsize)
    elif cfg.warmup:  # (first steps of new shapes run slow, as on the engine here)
        server.generate([[0] * max(1, min(64, server.max_model_len - 4)), [1] * 8], 4)
    rng = np.random.default_rng(cfg.seed)
    requests = generate(setup.workload, rng)
    vocab = setup.model.vocab_size
    arrivals = [(r.request_id, r.arrival_time, draw_prompt(rng, r, vocab), r.output_tokens)
                for r in requests]
    recorder = MetricsRecorder(setup.workload.warmup_s)
    bar = progress(cfg, setup, len(requests))
    start = time.perf_counter()
    server.serve(arrivals, recorder, VirtualClock(), setup.backend.latency_scale,
                 cfg.horizon_s, lambda report: bar.update(len(report.finished)), cost)
    wall = time.perf_counter() - start
    bar.close()
    metrics = recorder.summary(setup.slo.ttft_s, setup.slo.tbt_s)
    return summary_of(cfg, setup, requests, metrics, wall), recorder


def progress(cfg: DictConfig, setup: Setup, total: int) -> tqdm:
    return tqdm(total=total, unit="req", disable=not cfg.progress, leave=False,
                desc=f"{setup.label} @ {setup.workload.rate:g} req/s")


def summary_of(cfg: DictConfig, setup: Setup, requests: Sequence[RequestSpec], metrics: dict,
               wall: float) -> dict:
    """What summary.json holds: the run's identity, then its metrics."""
    return {
        "policy": setup.label,
        "policy_name": str(cfg.policy.name),
        "policy_params": policy_params(cfg.policy),
        "engine": setup.backend.name,
        "mode": setup.engine.mode,
        "latency": latency_label(setup.backend),
        "latency_scale": setup.backend.latency_scale,
        "hardware": setup.backend.hardware,
        "device": str(setup.engine.torch_device),
        "model": setup.engine.model,
        "workload": setup.workload.name,
        "rate": arrival_rate(setup.workload, requests),
        "arrival": setup.workload.arrival_source,
        "num_requests": len(requests),
        "duration_s": setup.workload.duration_s,
        "warmup_s": setup.workload.warmup_s,
        "seed": int(cfg.seed),
        "ttft_slo_s": setup.slo.ttft_s,
        "tbt_slo_s": setup.slo.tbt_s,
        **metrics,
        "wall_time_s": wall,
    }


def latency_label(backend: BackendConfig) -> str:
    """Where the run's iteration latencies came from: the simulator's profile, the cost
    model's (modeled), or the clock (measured; times ``latency_scale`` where scaled)."""
    if backend.name == "sim":
        return f"simulated:{backend.hardware}"
    if backend.latency_scale != 1:
        return f"{backend.latency} x{backend.latency_scale:.3g}"
    return backend.latency


def arrival_rate(workload: WorkloadConfig, requests: Sequence[RequestSpec]) -> float:
    """The run's request rate: the configured one, or where a trace brings its own arrival
    times (``workload.rate`` then plays no part), theirs: requests per second between the
    first arrival and the last."""
    if workload.arrival_source != "trace" or len(requests) < 2:
        return workload.rate
    span = requests[-1].arrival_time - requests[0].arrival_time
    return (len(requests) - 1) / span if span > 0 else workload.rate


def _finite(value: Any) -> Any:
    """NaN (an empty percentile) as JSON null, so the file stays strict JSON."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_requests_csv(recorder: MetricsRecorder, slo: SLO, path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for rec in recorder.requests.values():
            first = rec.token_times[0] if rec.token_times else ""
            w.writerow([rec.request_id, f"{rec.arrival_time:.6f}",
                        first if first == "" else f"{first:.6f}",
                        "" if rec.ttft is None else f"{rec.ttft:.6f}",
                        rec.prompt_tokens, rec.max_tokens, len(rec.token_times),
                        int(rec.finished), int(rec.rejected),
                        int(rec.attains(slo.ttft_s, slo.tbt_s)),
                        " ".join(f"{t:.6f}" for t in rec.token_times)])


def evaluate(cfg: DictConfig, out_dir: Path, overrides: Sequence[str] = ()) -> dict:
    """Run one evaluation; write ``summary.json`` and ``requests.csv`` into ``out_dir``."""
    setup = build(cfg, overrides)
    summary, recorder = run_episode(cfg, setup)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {k: _finite(v) for k, v in summary.items()}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    write_requests_csv(recorder, setup.slo, out_dir / "requests.csv")
    return summary


def format_line(s: dict) -> str:
    def num(key: str, scale: float = 1.0, fmt: str = ".3g") -> str:
        return "n/a" if s[key] is None else format(s[key] * scale, fmt)

    return (f"{s['policy']} @ {s['rate']:g} req/s: attainment {num('slo_attainment', 100, '.0f')}%"
            f" (TTFT {num('ttft_attainment', 100, '.0f')}%, TBT "
            f"{num('tbt_attainment', 100, '.0f')}%), TTFT p90 {num('ttft_p90_s')} s, TBT p99 "
            f"{num('tbt_p99_s', 1e3)} ms, {num('energy_per_token_j', 1e3)} mJ/token, "
            f"{s['requests_finished']}/{s['requests_total']} finished, "
            f"sim {s['sim_time_s']:.1f} s, wall {s['wall_time_s']:.1f} s")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="evaluate")
def _main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    try:
        summary = evaluate(cfg, out_dir, list(hc.overrides.task))
    except ConfigProblem as exc:
        overrides = " ".join(hc.overrides.task)
        sys.exit(f"lpenv-eval: invalid configuration{f' ({overrides})' if overrides else ''}: "
                 f"{exc}")
    print(format_line(summary), flush=True)
    log.info("wrote %s", out_dir / "summary.json")
    return summary["slo_attainment"]  # a sweeper that optimizes (e.g. Optuna) maximizes this


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
