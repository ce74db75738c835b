"""``lpenv-calibrate --replay RECORD``: a record's held-out iterations run again on the device,
side by side with grid iterations of the same kinds, to tell the cost model's error from the
machine's speed.

A held-out run is measured in its own minute; on a shared machine that minute can run 20%
slower than the grid's did, and the held-out error then says more about the machine than
about the fit. Replayed in one random order, the held-out and grid iterations meet the same
machine: their speeds (measured over predicted) agree where the cost model prices the
held-out shapes as well as the grid's, and the held-out error with the grid's replayed speed
divided out is the cost model's own. Nothing is fitted or installed: the profile is the
record's fit, as ``--refit`` makes it.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from tqdm import tqdm

from engine_adapter.calibration import Sample, percentage_errors, window_speed
from engine_adapter.calibration_record import CalibrationRecord
from engine_adapter.cost_model import CostModel
from engine_adapter.plan import IterationPlan
from engine_adapter.replay import replay, replayable
from scripts.calibrate import device_executor, error_percentiles, fitted_profile

GRID = "grid (the same kinds)"


def kind(plan: IterationPlan) -> tuple:
    """What sort of iteration: decode only, or its mode and its stages' numbers of groups."""
    return (plan.mode, tuple(st.num_groups for st in plan.stages)) if plan.stages else ()


def matching_grid(record: CalibrationRecord, held: list[Sample], seed: int) -> list[Sample]:
    """For each held-out sample, a grid sample of its kind drawn at random (none where the
    grid has none)."""
    pool: dict[tuple, list[Sample]] = defaultdict(list)
    for s in record.grid_samples:
        if replayable(s.plan):
            pool[kind(s.plan)].append(s)
    rng = np.random.default_rng(seed)
    return [pool[k][rng.integers(len(pool[k]))] for k in (kind(s.plan) for s in held)
            if pool[k]]


def replay_check(record: CalibrationRecord, name: str, settle_s: float | None = None,
                 seed: int = 0) -> dict:
    """Replay the record's held-out iterations beside as many grid ones on this device; the
    report (see the module's docstring)."""
    mc, dtype_bytes, profile = fitted_profile(record, name)
    fitted = CostModel(mc, profile, dtype_bytes)
    held = {label: [s for s in real["samples"] if replayable(s.plan)]
            for label, real in record.held_out.items()}
    every_held = [s for samples in held.values() for s in samples]
    sets = {GRID: matching_grid(record, every_held, seed), **held}
    engine_cfg, _, executor = device_executor(record.model, record.device, record.dtype,
                                              record.grid["prefill_budget"], settle_s)
    with tqdm(total=sum(map(len, sets.values())), desc="replay", unit="iteration") as bar:
        replayed = replay(executor, {k: [s.plan for s in v] for k, v in sets.items()},
                          engine_cfg.block_size, engine_cfg.num_kv_blocks, mc.vocab_size,
                          seed, bar.update)
    grid_speed = window_speed(fitted, replayed[GRID])
    held_replayed = [s for label in held for s in replayed[label]]
    return {
        "name": name, "model": mc.name, "device": record.device, "dtype": record.dtype,
        "profile_source": profile.source,
        "sets": {label: {"iterations": len(sets[label]),
                         "recorded_speed": window_speed(fitted, sets[label]),
                         "replayed_speed": window_speed(fitted, replayed[label]),
                         "replayed_error": error_percentiles(percentage_errors(fitted,
                                                                          replayed[label]))}
                 for label in sets},
        "held_out_error_grid_speed_removed": error_percentiles(
            percentage_errors(fitted, held_replayed, speed=grid_speed)),
        "not_replayable": {label: len(real["samples"]) - len(held[label])
                           for label, real in record.held_out.items()},
    }


def format_replay(r: dict) -> str:
    n = sum(s["iterations"] for s in r["sets"].values())
    lines = [f"replayed side by side on {r['device']}: {n} iterations in one random order "
             "(speed: measured over predicted, median)",
             f"  {'set':26s} {'iterations':>10s} {'speed as recorded':>18s} "
             f"{'speed replayed':>15s}   replayed error median / p90"]
    for label, s in r["sets"].items():
        e = s["replayed_error"]
        lines.append(f"  {label:26s} {s['iterations']:10d} {s['recorded_speed']:17.2f}x "
                     f"{s['replayed_speed']:14.2f}x   {e['median']:.1%} / {e['p90']:.1%}")
    h = r["held_out_error_grid_speed_removed"]
    lines.append(f"held-out iterations replayed, the grid's replayed speed divided out: median "
                 f"{h['median']:.1%}, p90 {h['p90']:.1%}")
    skipped = sum(r["not_replayable"].values())
    if skipped:
        lines.append(f"({skipped} held-out iterations continue a batch from an earlier "
                     "iteration and do not replay)")
    return "\n".join(lines)
