"""lpenv-calibrate: fit the cost model to the real engine on this device, and say how well.

1. Measures the device's peak matmul FLOP/s and copy bandwidth.
2. Runs the real engine over a grid of batch shapes (``engine_adapter.calibration``) and fits
   the cost model's overheads and efficiencies to every iteration's measured latency.
   On the CPU a peak probe (a small matmul and a copy) is timed before every measured
   iteration, and the fit prices each iteration at the device's pace then
   (``engine_adapter.peak_probe``); the report gives the errors as measured and at that pace.
3. Records the routers' distinct experts against rows (an empirical routing model).
4. Writes the profile (``hardware=cpu-auto``, or ``backend.hardware=NAME`` for ``--name``) into
   ``$LPENV_PROFILE_DIR`` (default ``~/.cache/lpenv/profiles``) and the routing table into its
   ``routing/`` folder (``backend.routing=empirical:PATH``).
5. Fidelity on a workload it did not fit on: a CPU-scaled arXiv workload served by the paper
   rule (layered) and by chunked prefill, on the real engine (measured, between the grid's
   two passes so that the machine's drift reaches fit and test alike) and on the simulator
   with the new profile and routing table. The workload and its SLOs are stretched to this
   machine's pace against ``cpu-generic``'s over the grid's first pass (``held_out_at``), so
   that a slower machine is not simply overloaded. Reports the median and p90 absolute
   percentage error of iteration latency (with the routers' own distinct experts, and with
   the routing model's), and the episode-level error of TTFT, end-to-end time and SLO
   attainment.
6. Where the device has an energy counter (NVML on a GPU), holds sustained loads for
   ``--energy-s`` seconds each and fits the profile's energy constants (static power, energy
   per byte and per FLOP) to the counter (``engine_adapter.energy_fit``); elsewhere the
   profile keeps its datasheet's modeled constants, and the report says which.

Writes ``<out>/<name>.json`` (the report), ``<out>/<name>_fidelity.png`` and
``<out>/<name>_record.json``: every measurement (``engine_adapter.calibration_record``), so that
``lpenv-calibrate --refit <out>/<name>_record.json`` fits and reports again anywhere, without
the device (measure on a borrowed GPU for minutes, fit at leisure).
Run it on an otherwise idle machine: another process on the same cores changes the timings.

``--speed`` measures only how many times as long as a profile (``--against``, default
``cpu-generic``) this machine runs the engine (``engine_adapter.reference_speed``) and writes
``<out>/speed.json`` with the ``backend.latency_scale`` that runs measured latencies at that
profile's pace: ``make run``'s first step. Given lpenv-eval's overrides after it
(``lpenv-calibrate --speed --out DIR model=mixtral-tiny ...``), it measures the model, dtype
and device those runs use, as make run does with its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine_adapter.calibration import (
    CalibrationGrid,
    EnergyLoads,
    RecordingExecutor,
    base_profile,
    energy_spans,
    fit_energy,
    fit_profile,
    measure_peaks,
    measurement_scatter,
    pass_drift,
    percentage_errors,
    predicted_latencies,
    profile_grid,
    routing_observations,
    window_speed,
)
from engine_adapter.calibration_record import CalibrationRecord
from engine_adapter.config import EngineConfig
from engine_adapter.cost_model import CostModel, coefficients, term_names
from engine_adapter.energy import EnergyModel
from engine_adapter.energy_fit import energy_counter
from engine_adapter.engine import Engine, build_model, warm_up
from engine_adapter.errors import ConfigError
from engine_adapter.executor_sim import SimExecutor
from engine_adapter.executor_torch import TorchExecutor
from engine_adapter.hardware import (
    DATASHEET_PROFILES,
    HardwareProfile,
    profile_dir,
    resolve_profile,
    write_profile,
)
from engine_adapter.model_config import DEFAULT_MODEL, ModelConfig
from engine_adapter.peak_probe import PeakProbe, PeakTrace
from engine_adapter.reference_speed import SPEED_GRID, measure_reference_speed, reference_speed
from engine_adapter.routing import RoutingModel, record_routing
from lpenv.episode import Episode
from lpenv.reward import SLO, RewardConfig
from lpenv.workload import WorkloadConfig, generate
from policies.chunked import ChunkedPrefill
from policies.paper_rule import PaperRule

# The held-out workload: conf/workload/arxiv4k.yaml with conf/engine/cpu.yaml's budgets and
# conf/slo/cpu.yaml's SLOs, at a rate both modes serve without collapsing on the machine
# those SLOs were set on (cpu-generic's).
HELD_OUT = WorkloadConfig(name="arxiv4k", rate=3.0, num_requests=24, lengths="arxiv4k",
                          scale=0.125, min_prompt=16, max_prompt=2048, min_output=4,
                          max_output=64)
HELD_OUT_SLO = SLO(ttft_s=2.0, tbt_s=0.125)
# A machine that runs the engine s times as long as that one gets the workload stretched by s
# (arrivals s times as far apart, SLOs s times as long), so that its episodes are neither
# overloaded (0% attained both ways tells nothing) nor idle.
HELD_OUT_REFERENCE = "cpu-generic"


def held_out_at(pace: float) -> tuple[WorkloadConfig, SLO]:
    """The held-out workload and SLOs for a machine ``pace`` times as slow as the reference."""
    return (replace(HELD_OUT, rate=HELD_OUT.rate / pace),
            SLO(HELD_OUT_SLO.ttft_s * pace, HELD_OUT_SLO.tbt_s * pace))


def error_percentiles(errors: np.ndarray) -> dict:
    return {"median": float(np.median(errors)), "p90": float(np.percentile(errors, 90)),
            "mean": float(errors.mean()), "samples": int(errors.size)}


# The paper rule with its thresholds scaled like conf/engine/cpu.yaml's budgets (unit 64).
HELD_OUT_POLICIES = {
    "layered (paper rule)": lambda mc: PaperRule(max_groups=mc.num_layers, unit=64),
    "chunked (64)": lambda mc: ChunkedPrefill(chunk_tokens=64),
}


def held_out_episode(engine_cfg: EngineConfig, mc: ModelConfig, label: str, executor,
                     seed: int, pace: float = 1.0) -> tuple[dict, object]:
    """One policy on the held-out workload at ``pace`` (``held_out_at``), on ``executor``:
    its summary and the executor."""
    policy = HELD_OUT_POLICIES[label](mc)
    cfg = replace(engine_cfg, mode=policy.mode,
                  chunk_tokens=getattr(policy, "chunk_tokens", engine_cfg.chunk_tokens))
    engine = Engine(cfg, executor=executor, model_config=mc)
    rng = np.random.default_rng(seed)
    workload, slo = held_out_at(pace)
    episode = Episode(engine, generate(workload, rng), slo, RewardConfig(), rng)
    return episode.run(policy), executor


def _episode_errors(runs: dict) -> dict:
    measured, simulated = runs["measured"], runs["simulated"]
    keys = ("ttft_mean_s", "ttft_p90_s", "e2e_mean_s", "iteration_p50_s", "slo_attainment")
    row = {f"{k}_{side}": s[k] for k in keys for side, s in
           (("measured", measured), ("simulated", simulated))}
    for k in ("ttft_mean_s", "e2e_mean_s", "iteration_p50_s"):
        row[f"{k}_error"] = abs(simulated[k] - measured[k]) / measured[k]
    row["slo_attainment_error_points"] = abs(simulated["slo_attainment"]
                                             - measured["slo_attainment"]) * 100
    return row


def plot_fidelity(samples, cost: CostModel, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = np.array([s.measured_s for s in samples]) * 1e3
    predicted = predicted_latencies(cost, samples) * 1e3
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(measured, predicted, s=6, alpha=0.5)
    lo, hi = min(measured.min(), predicted.min()), max(measured.max(), predicted.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="exact")
    ax.fill_between([lo, hi], [0.95 * lo, 0.95 * hi], [1.05 * lo, 1.05 * hi], alpha=0.15,
                    color="k", label="±5%")
    ax.set(xscale="log", yscale="log", xlabel="measured iteration latency (ms)",
           ylabel="predicted (ms)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def held_out_config(model: str, dtype: str, device: str = "cpu") -> EngineConfig:
    """The engine the held-out episodes run on (on the device, and on the simulator)."""
    return EngineConfig(model=model, device=device, dtype=dtype, prefill_budget=1024,
                        chunk_tokens=64, kv_cache_tokens=32768, max_num_seqs=64)


def settle(executor, cfg: EngineConfig, mc: ModelConfig, seconds: float) -> None:
    """Keep the device busy for ``seconds`` before measuring. On the H200 we were lent, the
    same grid ran 23% faster (median) in its second pass than in its first without it: a
    device just out of idle is not yet at the speed it serves at."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        warm_up(executor, cfg, mc, tokens=512)


def device_executor(model: str, device: str, dtype: str, prefill_budget: int,
                    settle_s: float | None) -> tuple[EngineConfig, ModelConfig, TorchExecutor]:
    """The real engine's executor on the device, warmed up (and on a GPU, by default, kept
    busy for a while first: ``settle``), with the engine config it was built for."""
    engine_cfg = EngineConfig(model=model, device=device, dtype=dtype,
                              prefill_budget=prefill_budget, kv_cache_tokens=65536)
    mc = ModelConfig.load(model)
    executor = TorchExecutor(build_model(engine_cfg, mc), engine_cfg.num_kv_blocks,
                             engine_cfg.block_size)
    warm_up(executor, engine_cfg, mc)
    if settle_s is None:
        settle_s = 10.0 if engine_cfg.torch_device.type == "cuda" else 0.0
    settle(executor, engine_cfg, mc, settle_s)
    return engine_cfg, mc, executor


def measure(args: argparse.Namespace) -> CalibrationRecord:
    """Everything that needs the device: peaks, the grid and the held-out episodes."""
    grid = CalibrationGrid.quick() if args.quick else CalibrationGrid()
    if args.repeats:
        grid = replace(grid, repeats=args.repeats)
    engine_cfg, mc, executor = device_executor(args.model, args.device, args.dtype,
                                               grid.prefill_budget, args.settle_s)
    device = engine_cfg.torch_device
    flops, bandwidth = measure_peaks(device, engine_cfg.torch_dtype)

    # Two passes over the grid with the held-out runs between them: a shared machine's speed
    # drifts over minutes, and this way the drift reaches the fit and the test alike.
    passes = max(1, grid.repeats)
    one = replace(grid, repeats=1)
    held_cfg = held_out_config(args.model, args.dtype, args.device)
    # The device's pace, probed before every iteration (``peak_probe``; on the CPU, where
    # other tenants move it; a GPU is settled instead).
    probe = PeakProbe(device, engine_cfg.torch_dtype) if (
        device.type == "cpu" and not args.no_peak_probe) else None
    bar = tqdm(total=grid.size(mc.num_layers), desc="grid", unit="probe")
    samples = profile_grid(engine_cfg, mc, executor, one, seed=args.seed, on_probe=bar.update,
                           peak_probe=probe)
    # (this machine's speed against the reference, as --speed measures it, on the grid's pass)
    pace = reference_speed(samples, CostModel(mc, DATASHEET_PROFILES[HELD_OUT_REFERENCE],
                                              engine_cfg.torch_dtype.itemsize)).speed
    held_out = {}
    for label in HELD_OUT_POLICIES:
        executor.reset()
        summary, recorder = held_out_episode(held_cfg, mc, label,
                                             RecordingExecutor(executor, probe),
                                             args.seed + 1000, pace)
        held_out[label] = {"summary": summary, "samples": recorder.samples}
    for i in range(1, passes):
        executor.reset()
        samples += profile_grid(engine_cfg, mc, executor, one, seed=args.seed + i,
                                on_probe=bar.update, peak_probe=probe)
    bar.close()
    spans, counter = [], None
    energy_s = args.energy_s if args.energy_s is not None else 2.0
    if energy_s > 0:
        counter = energy_counter(device.type, device.index or 0)
    if counter is not None:
        loads = replace(EnergyLoads(), seconds=energy_s)
        with tqdm(total=len(loads.shapes()), desc="energy", unit="load") as energy_bar:
            spans = energy_spans(engine_cfg, mc, executor, counter, loads, args.seed,
                                 on_span=energy_bar.update)
    flops_after, bandwidth_after = measure_peaks(device, engine_cfg.torch_dtype)
    where = device.type
    if device.type == "cuda":
        where += f": {torch.cuda.get_device_name(device)}"
    threads = torch.get_num_threads()
    source = (f"lpenv-calibrate on {platform.node() or 'this machine'} ({where}, "
              f"{os.cpu_count()} CPUs visible, {threads} torch thread{'s' * (threads != 1)}), "
              f"{time.strftime('%Y-%m-%d')}, model {mc.name}")
    return CalibrationRecord(
        model=mc.name, device=device.type, dtype=args.dtype, source=source,
        peaks={"flops": flops, "bandwidth": bandwidth, "flops_after": flops_after,
               "bandwidth_after": bandwidth_after,
               **({"memory_bytes": torch.cuda.get_device_properties(device).total_memory}
                  if device.type == "cuda" else {})},
        grid={**asdict(grid), "quick": args.quick}, seed=args.seed, grid_samples=samples,
        held_out=held_out, energy_spans=spans,
        energy_counter=counter.source if counter is not None else None,
        threads=threads, held_out_pace=pace)


def peak_trace(record: CalibrationRecord) -> PeakTrace | None:
    """The device's pace over the record's measurement (grid and held-out runs alike: they
    ran in between); None for a record measured without the peak probe."""
    return PeakTrace.of(record.grid_samples + [s for real in record.held_out.values()
                                               for s in real["samples"]])


def fitted_profile(record: CalibrationRecord, name: str
                   ) -> tuple[ModelConfig, int, HardwareProfile]:
    """The record's model, its bytes per value, and the latency profile fitted to its grid
    (at the device's probed pace, where the record has one: ``peak_trace``)."""
    mc = ModelConfig.load(record.model)
    dtype_bytes = EngineConfig(model=record.model, dtype=record.dtype).torch_dtype.itemsize
    like = DATASHEET_PROFILES["cpu-generic" if record.device == "cpu" else "h100-sxm"]
    peaks = record.peaks
    # (a GPU's memory, where the record has it: the CPU's host memory is not checked)
    base = base_profile(name, peaks["flops"], peaks["bandwidth"], like,
                        peaks.get("memory_bytes", 0.0))
    samples = record.grid_samples
    trace = peak_trace(record)
    source = f"{record.source}, {len(samples)} iterations" + (
        ", at the pace a peak probe read before each" if trace is not None else "")
    return mc, dtype_bytes, fit_profile(base, CostModel(mc, base, dtype_bytes), samples, name,
                                        source, trace)


def fit(record: CalibrationRecord, name: str, profiles: Path, out: Path) -> dict:
    """Fit the profile to a record, write it and its routing table, and test both on the
    record's held-out episodes (no device needed)."""
    mc, dtype_bytes, profile = fitted_profile(record, name)
    peaks, samples = record.peaks, record.grid_samples
    energy_model, energy = _energy(record, name, profile.energy)
    if record.energy_spans:  # the device's own energy constants
        profile = replace(profile, energy=energy_model,
                          source=f"{profile.source}; energy fitted to {record.energy_counter} "
                                 f"over {len(record.energy_spans)} loads")
    profile_path = write_profile(profile, profiles / f"{name}.json")
    routing = record_routing(routing_observations(samples, mc), mc)
    routing_path = profiles / "routing" / f"{mc.name}.json"
    routing_path.parent.mkdir(parents=True, exist_ok=True)
    routing_path.write_text(json.dumps(routing, indent=1) + "\n")

    fitted = CostModel(mc, profile, dtype_bytes)
    held_cfg = held_out_config(record.model, record.dtype)
    held_pace = record.held_out_pace or 1.0
    held_workload, held_slo = held_out_at(held_pace)
    episodes = {}
    for label, real in record.held_out.items():
        sim = SimExecutor(mc, CostModel(mc, str(profile_path), dtype_bytes),
                          f"empirical:{routing_path}", str(profile_path), seed=record.seed)
        episodes[label] = {"measured": real["summary"],
                           "simulated": held_out_episode(held_cfg, mc, label, sim,
                                                         record.seed + 1000, held_pace)[0]}
    held = [s for real in record.held_out.values() for s in real["samples"]]
    # Each held-out run's speed, and the error left with it divided out (``window_speed``).
    speeds = {label: window_speed(fitted, real["samples"])
              for label, real in record.held_out.items()}
    shape_errors = np.concatenate(
        [percentage_errors(fitted, real["samples"], speed=speeds[label])
         for label, real in record.held_out.items()]) if held else np.zeros(0)
    routing_model = RoutingModel(mc, f"empirical:{routing_path}")
    trace = peak_trace(record)

    def modeled_distinct(s):
        from engine_adapter.executor_sim import layer_rows

        return [routing_model.distinct(r) if moe and r else None
                for moe, r in zip(mc.moe_layers, layer_rows(s.plan))]

    report = {
        "name": name, "profile_path": str(profile_path), "routing_path": str(routing_path),
        "model": mc.name, "device": record.device, "dtype": record.dtype,
        "quick": record.grid.get("quick", False), "torch_threads": record.threads,
        "measured_peak_flops": peaks["flops"], "measured_bandwidth": peaks["bandwidth"],
        # The same measurements at the end: how much the machine's speed moved meanwhile.
        "measured_peak_flops_after": peaks["flops_after"],
        "measured_bandwidth_after": peaks["bandwidth_after"],
        "grid": record.grid, "grid_iterations": len(samples),
        "grid_pass_drift": pass_drift(samples, record.grid["repeats"]),
        "measurement_scatter": measurement_scatter(samples, record.grid["repeats"]),
        "coefficients": dict(zip(term_names(profile), coefficients(profile).tolist())),
        "profile": profile.to_json(),
        "fit_error": error_percentiles(percentage_errors(fitted, samples)),
        "held_out_workload": {**asdict(held_workload), "seed": record.seed + 1000,
                              "ttft_slo_s": held_slo.ttft_s, "tbt_slo_s": held_slo.tbt_s,
                              "pace": record.held_out_pace, "reference": HELD_OUT_REFERENCE},
        "held_out_iteration_error": error_percentiles(percentage_errors(fitted, held)),
        "held_out_iteration_error_routing_model": error_percentiles(
            percentage_errors(fitted, held, modeled_distinct)),
        "held_out_speed": speeds,
        "held_out_iteration_error_speed_removed": error_percentiles(shape_errors),
        "held_out_episodes": {label: _episode_errors(runs) for label, runs in episodes.items()},
        "energy": energy,
    }
    if trace is not None:  # the same, each iteration priced at the device's pace then
        report.update({
            "peak_trace": trace.spread(),
            "fit_error_paced": error_percentiles(percentage_errors(fitted, samples,
                                                                   trace=trace)),
            "held_out_iteration_error_paced": error_percentiles(
                percentage_errors(fitted, held, trace=trace)),
            "held_out_iteration_error_routing_model_paced": error_percentiles(
                percentage_errors(fitted, held, modeled_distinct, trace=trace)),
        })
    out.mkdir(parents=True, exist_ok=True)
    plot_fidelity(held, fitted, out / f"{name}_fidelity.png",
                  f"{name}: held-out iterations ({mc.name})")
    return report


def _energy(record: CalibrationRecord, name: str, modeled: EnergyModel
            ) -> tuple[EnergyModel, dict]:
    """The profile's energy constants, fitted to the record's energy spans where it has any
    (the datasheet's ``modeled`` ones otherwise), and what the report says of them."""
    if not record.energy_spans:
        return modeled, {"source": f"modeled: {modeled.name} constants (no energy counter on "
                                   f"{record.device})", **asdict(modeled)}
    model, errors = fit_energy(record.energy_spans, f"{name}-{record.energy_counter}")
    return model, {"source": f"fitted to {record.energy_counter} over "
                             f"{len(record.energy_spans)} sustained loads", **asdict(model),
                   "span_error": error_percentiles(errors),
                   "spans": [s.to_json() for s in record.energy_spans]}


def format_report(r: dict) -> str:
    e, h, m = r["fit_error"], r["held_out_iteration_error"], r[
        "held_out_iteration_error_routing_model"]
    lines = [
        f"profile {r['name']} -> {r['profile_path']}",
        f"measured by {r['profile']['source']}",
        f"measured peaks: {r['measured_peak_flops'] / 1e9:.1f} GFLOP/s, "
        f"{r['measured_bandwidth'] / 1e9:.1f} GB/s at the start, "
        f"{r['measured_peak_flops_after'] / 1e9:.1f} GFLOP/s, "
        f"{r['measured_bandwidth_after'] / 1e9:.1f} GB/s at the end; grid of "
        f"{r['grid_iterations']} iterations",
    ]
    drift = r.get("grid_pass_drift")
    if drift is not None:
        lines.append(f"the same grid iterations took {drift:.2f}x as long in the last pass as in "
                     "the first" + ("" if abs(drift - 1) < 0.05 else
                                    ": an unsteady machine (other load, or a device out of "
                                    "idle: try --settle-s), and the fit averages over it"))
    scatter = r.get("measurement_scatter")
    if scatter is not None:
        lines.append(f"the same grid iteration measured again minutes later strayed "
                     f"{scatter:.1%} (median, drift aside): how steady the machine was")
    lines += [
        "iteration latency error (|predicted - measured| / measured):",
        f"  fit grid (in sample)          median {e['median']:.1%}  p90 {e['p90']:.1%}",
        f"  held-out, routers' experts    median {h['median']:.1%}  p90 {h['p90']:.1%}"
        f"  ({h['samples']} iterations)",
        f"  held-out, routing model       median {m['median']:.1%}  p90 {m['p90']:.1%}",
    ]
    w = r.get("held_out_iteration_error_speed_removed")
    if w is not None and w["samples"]:
        speeds = ", ".join(f"{v:.2f}x" for v in r["held_out_speed"].values())
        lines.append(f"  held-out, each run's speed out median {w['median']:.1%}  p90 "
                     f"{w['p90']:.1%}  (the held-out runs took {speeds} the fitted time: the "
                     "machine's speed then)")
        if any(abs(v - 1) > 0.05 for v in r["held_out_speed"].values()):
            lines.append("  (to tell the machine's speed from the cost model's error, run the "
                         "held-out iterations again beside grid ones: lpenv-calibrate --replay "
                         f"{r.get('record_path', 'RECORD')})")
    if "peak_trace" in r:
        t, pe, ph, pm = (r["peak_trace"], r["fit_error_paced"], r["held_out_iteration_error_paced"],
                         r["held_out_iteration_error_routing_model_paced"])
        lines += [
            f"at the device's pace a peak probe read before each iteration ({t['readings']} "
            f"readings; per FLOP {t['compute_p10']:.2f}-{t['compute_p90']:.2f}x, per byte "
            f"{t['memory_p10']:.2f}-{t['memory_p90']:.2f}x the median, p10-p90):",
            f"  fit grid (in sample)          median {pe['median']:.1%}  p90 {pe['p90']:.1%}",
            f"  held-out, routers' experts    median {ph['median']:.1%}  p90 {ph['p90']:.1%}",
            f"  held-out, routing model       median {pm['median']:.1%}  p90 {pm['p90']:.1%}",
        ]
    w = r["held_out_workload"]
    lines += [
        f"held-out episodes (real engine vs simulator; {w['num_requests']} requests at "
        f"{w['rate']:.2f} req/s, SLOs TTFT {w['ttft_slo_s']:.2f} s and TBT {w['tbt_slo_s']:.3f} s"
        + (f": {w['reference']}'s stretched to this machine's pace, {w['pace']:.2f}x as long):"
           if w["pace"] is not None else f", at {w['reference']}'s pace):"),
        f"  {'policy':22s} {'TTFT mean (s)':>16s} {'e2e mean (s)':>16s} {'attainment':>14s}",
    ]
    for label, x in r["held_out_episodes"].items():
        lines.append(
            f"  {label:22s} {x['ttft_mean_s_measured']:6.3f} vs {x['ttft_mean_s_simulated']:6.3f}"
            f" {x['e2e_mean_s_measured']:6.3f} vs {x['e2e_mean_s_simulated']:6.3f}"
            f" {x['slo_attainment_measured']:5.0%} vs {x['slo_attainment_simulated']:4.0%}")
        lines.append(f"  {'':22s} error {x['ttft_mean_s_error']:9.1%} error "
                     f"{x['e2e_mean_s_error']:9.1%} {x['slo_attainment_error_points']:8.1f} pts")
    en = r["energy"]
    lines.append(f"energy: {en['source']}: static {en['static_w']:.1f} W, "
                 f"{en['j_per_byte'] * 1e12:.1f} pJ/byte, {en['j_per_flop'] * 1e12:.2f} pJ/FLOP"
                 + (f"; span error median {en['span_error']['median']:.1%}, p90 "
                    f"{en['span_error']['p90']:.1%}" if "span_error" in en else ""))
    lines.append(f"use it: backend.hardware={r['name']}"
                 + (" (or hardware=cpu-auto)" if r["name"] == "cpu-auto" else "") + "; "
                 f"routing: backend.routing=empirical:{r['routing_path']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--name", default=None, help="profile name (default: cpu-auto or cuda-auto)")
    p.add_argument("--profile-dir", default=None,
                   help="where profiles go (default: $LPENV_PROFILE_DIR or "
                        "~/.cache/lpenv/profiles)")
    p.add_argument("--out", default="results/calibration", help="report and plot folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a small grid (smoke test)")
    p.add_argument("--repeats", type=int, default=None,
                   help="passes over the grid (default 2; 1 halves the time)")
    p.add_argument("--settle-s", type=float, default=None,
                   help="seconds of load before measuring (default 10 on a GPU, 0 on the CPU)")
    p.add_argument("--no-peak-probe", action="store_true",
                   help="on the CPU, do not time a small matmul and copy before each measured "
                        "iteration (about 4 ms each; the fit then averages over the machine's "
                        "pace instead of pricing each iteration at it)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads the engine runs with (default: torch's own, "
                        "OMP_NUM_THREADS or every core). Where other work shares the cores "
                        "(a VM's), the engine is steadier on fewer: make calibrate uses 1. The "
                        "profile describes the engine at this many")
    p.add_argument("--energy-s", type=float, default=None,
                   help="seconds each energy load is held where the device has an energy "
                        "counter (default 2; 0 skips the energy fit)")
    p.add_argument("--refit", default=None, metavar="RECORD",
                   help="fit and report from a record an earlier run wrote (<out>/<name>_record"
                        ".json; no device needed) instead of measuring")
    p.add_argument("--replay", default=None, metavar="RECORD",
                   help="run a record's held-out iterations again on this device, side by side "
                        "with grid ones of the same kinds (the record's model, device and dtype), "
                        "and report how much of the held-out error was the machine's speed; "
                        "fits and installs nothing")
    p.add_argument("--speed", action="store_true",
                   help="measure only how many times as long as --against this machine runs "
                        "the engine (a short grid, about 15 s here) and write "
                        "<out>/speed.json with the backend.latency_scale that runs measured "
                        "latencies at that profile's pace (make run's); fits and installs "
                        "nothing")
    p.add_argument("--against", default="cpu-generic",
                   help="--speed's reference profile (cpu-generic: the machine the CPU SLOs "
                        "were set on)")
    p.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                   help="with --speed: lpenv-eval's overrides (model=..., engine.dtype=...); "
                        "the probe measures the model, dtype and device those runs use instead "
                        "of --model, --dtype and --device")
    args = p.parse_args(argv)
    if args.overrides and not args.speed:
        p.error(f"overrides ({' '.join(args.overrides)}) go with --speed only")
    if args.speed and (args.refit or args.replay or args.repeats
                       or args.energy_s is not None or args.no_peak_probe):
        p.error("--speed measures a short grid of its own: --refit, --replay, --repeats, "
                "--energy-s and --no-peak-probe do not apply")
    if args.replay and (args.refit or args.quick or args.repeats or args.energy_s is not None
                        or args.no_peak_probe or args.threads is not None):
        p.error("--replay runs a record's iterations again (at its thread count): --refit, "
                "--quick, --repeats, --energy-s, --no-peak-probe and --threads do not apply")
    if args.refit and (args.quick or args.repeats or args.settle_s is not None
                       or args.energy_s is not None or args.no_peak_probe
                       or args.threads is not None):
        p.error("--quick, --repeats, --settle-s, --energy-s, --no-peak-probe and --threads "
                "shape a measurement; --refit measures nothing")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    if args.energy_s is not None and args.energy_s < 0:
        p.error(f"--energy-s must be >= 0 (0 skips the energy fit), got {args.energy_s}")
    if args.repeats is not None and args.repeats < 1:
        p.error(f"--repeats must be at least 1 (passes over the grid), got {args.repeats}")
    if args.settle_s is not None and args.settle_s < 0:
        p.error(f"--settle-s must be >= 0, got {args.settle_s}")
    started = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.speed:
        speed_main(args, p, started)
        return
    if args.replay:
        replay_main(args, p, started)
        return
    try:
        if args.refit:
            record = CalibrationRecord.read(args.refit)
        else:
            record = measure(args)
        name = args.name or f"{record.device}-auto"
        out = Path(args.out)
        if not args.refit:
            record_path = record.write(out / f"{name}_record.json")
        report = fit(record, name, Path(args.profile_dir) if args.profile_dir else profile_dir(),
                     out)
    except (ConfigError, ValueError) as exc:  # a bad model, device or dtype: say so, briefly
        p.exit(2, f"lpenv-calibrate: {exc}\n")
    report["record_path"] = str(Path(args.refit) if args.refit else record_path)
    report["wall_s"] = time.perf_counter() - started
    path = out / f"{name}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    print(f"wrote {path} in {report['wall_s']:.0f} s (measurements: {report['record_path']})")


def speed_main(args: argparse.Namespace, p: argparse.ArgumentParser, started: float) -> None:
    """``--speed`` (``engine_adapter.reference_speed``)."""
    try:
        if args.overrides:
            args.model, args.dtype, args.device = evaluated_engine(args.overrides)
        reference = resolve_profile(args.against)
        grid = CalibrationGrid.quick() if args.quick else SPEED_GRID
        cfg, mc, executor = device_executor(args.model, args.device, args.dtype,
                                            grid.prefill_budget, args.settle_s)
        with tqdm(total=grid.size(mc.num_layers), desc="speed", unit="probe") as bar:
            speed = measure_reference_speed(executor, cfg, mc, reference, grid, args.seed,
                                            bar.update)
    except (ConfigError, ValueError) as exc:
        p.exit(2, f"lpenv-calibrate: {exc}\n")
    report = {"model": mc.name, "device": str(cfg.torch_device), "dtype": args.dtype,
              "torch_threads": torch.get_num_threads(), "quick": args.quick,
              **speed.to_json(), "wall_s": time.perf_counter() - started}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "speed.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"this machine ran {speed.iterations} iterations of {mc.name} {speed.speed:.2f}x as "
          f"long as {speed.reference} prices them (median; p10-p90 {speed.p10:.2f}-"
          f"{speed.p90:.2f}x): {report['override']} runs measured latencies at "
          f"{speed.reference}'s pace")
    print(f"wrote {path} in {report['wall_s']:.0f} s")


def evaluated_engine(overrides: list[str]) -> tuple[str, str, str]:
    """The model, dtype and device ``lpenv-eval OVERRIDES`` runs the engine with (its config
    composed as it composes it); a ValueError that says what is wrong with them."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from scripts.evaluate import CONFIG_DIR

    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            engine = compose("evaluate", overrides=list(overrides)).engine
    except (HydraException, OmegaConfBaseException) as exc:
        raise ValueError(f"lpenv-eval's overrides {' '.join(overrides)}: {exc}") from exc
    return engine.model, engine.dtype, engine.device


def replay_main(args: argparse.Namespace, p: argparse.ArgumentParser, started: float) -> None:
    """``--replay RECORD`` (``scripts.calibrate_replay``)."""
    from scripts.calibrate_replay import format_replay, replay_check

    try:
        record = CalibrationRecord.read(args.replay)
        if record.threads:  # the engine as it was measured
            torch.set_num_threads(record.threads)
        name = args.name or f"{record.device}-auto"
        report = replay_check(record, name, args.settle_s, args.seed)
    except (ConfigError, ValueError) as exc:
        p.exit(2, f"lpenv-calibrate: {exc}\n")
    report["record_path"] = args.replay
    report["wall_s"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}_replay.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(format_replay(report))
    print(f"wrote {path} in {report['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
