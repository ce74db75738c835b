"""Calibration: the cost model's linear form, the fit, the empirical routing model and the CLI."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from engine_adapter.calibration import (
    CalibrationGrid,
    Sample,
    design_matrix,
    fit_coefficients,
    fit_profile,
    measurement_scatter,
    pass_drift,
    percentage_errors,
    profile_grid,
    routing_observations,
    window_speed,
)
from engine_adapter.calibration_record import CalibrationRecord
from engine_adapter.config import EngineConfig
from engine_adapter.cost_model import CostModel, coefficients, from_coefficients, term_names
from engine_adapter.decision import Decision
from engine_adapter.engine import Engine
from engine_adapter.errors import ConfigError
from engine_adapter.executor_sim import SimExecutor
from engine_adapter.hardware import DATASHEET_PROFILES, resolve_profile
from engine_adapter.model_config import ModelConfig
from engine_adapter.peak_probe import PeakProbe, PeakTrace, paced_terms
from engine_adapter.plan import IterationPlan, Segment, StageWork
from engine_adapter.reference_speed import reference_speed
from engine_adapter.routing import RoutingModel, record_routing
from engine_adapter.scaled_latency import ScaledLatency
from tests.sim_episode import play_trivially

# A sum-form profile with every term in play, none of them round numbers.
TRUE = replace(DATASHEET_PROFILES["cpu-generic"], name="truth", iteration_overhead_s=7e-4,
               row_overhead_s=3e-6, layer_overhead_s=3e-4, attention_call_overhead_s=6e-5,
               expert_overhead_s=4e-5, matmul_efficiency=0.7,
               expert_efficiency=0.45, attention_efficiency=0.3, weight_efficiency=0.9,
               kv_efficiency=0.25, expert_curve_knots=(2.0, 8.0), expert_curve_s=(3e-6, 1e-6))


def _sim_samples(profile, grid=None, model="qwen3-moe-tiny"):
    mc = ModelConfig.load(model)
    cost = CostModel(mc, profile, 4)
    executor = SimExecutor(mc, cost, "zipf:0.8")
    base = EngineConfig(model=model, prefill_budget=512, kv_cache_tokens=16384)
    grid = grid or CalibrationGrid(decode=((0, 0), (3, 40), (9, 200)), prefill=(8, 60, 300),
                                   groups=(1, 2, 5), chunks=(16, 64), repeats=1)
    return mc, cost, profile_grid(base, mc, executor, grid)


def test_terms_are_what_price_is_linear_in():
    mc, cost, samples = _sim_samples(TRUE)
    terms, measured = design_matrix(cost, samples)
    np.testing.assert_allclose(terms @ coefficients(TRUE), measured, rtol=1e-9)
    assert len(samples) > 50


def test_fit_recovers_the_profile_that_made_the_latencies():
    """Latencies priced by a known profile: the fit finds its coefficients, up to noise."""
    mc, cost, samples = _sim_samples(TRUE)
    terms, measured = design_matrix(cost, samples)
    coef = fit_coefficients(terms, measured)
    np.testing.assert_allclose(coef, coefficients(TRUE), rtol=1e-6)
    noisy = measured * np.random.default_rng(0).lognormal(0, 0.03, measured.size)
    fitted = from_coefficients(TRUE, fit_coefficients(terms, noisy))
    errors = percentage_errors(CostModel(mc, fitted, 4), samples)
    assert np.median(errors) < 0.03


def test_window_speed_takes_the_machines_speed_out_of_the_error():
    """Iterations measured while the machine ran 20% slower than at the fit (2% noise): the
    error against the fit is the 20%, the window's speed is found, and with it divided out
    only the noise is left."""
    mc, cost, samples = _sim_samples(TRUE)
    noise = np.random.default_rng(1).lognormal(0, 0.02, len(samples))
    slow = [replace(s, measured_s=1.2 * s.measured_s * n) for s, n in zip(samples, noise)]
    speed = window_speed(cost, slow)
    assert speed == pytest.approx(1.2, rel=0.01)
    assert np.median(percentage_errors(cost, slow)) == pytest.approx(0.2 / 1.2, abs=0.01)
    assert np.median(percentage_errors(cost, slow, speed=speed)) < 0.02
    assert window_speed(cost, samples) == pytest.approx(1.0, rel=1e-9)


def _paced(samples, compute, memory):
    """``samples`` re-measured at a pace per sample (how many times as long per FLOP and per
    byte as the median), each with the peak probe's reading of it (a matmul of 3 ms and a copy
    of 0.7 ms at the median pace), one second apart."""
    terms, _ = design_matrix(CostModel(ModelConfig.load("qwen3-moe-tiny"), TRUE, 4), samples)
    scales = np.c_[compute, memory]
    measured = paced_terms(terms, scales, term_names(TRUE)) @ coefficients(TRUE)
    return [replace(s, measured_s=float(m), probe=(float(i), 3e-3 * c, 7e-4 * b))
            for i, (s, m, c, b) in enumerate(zip(samples, measured, compute, memory))]


def test_the_peak_trace_prices_each_iteration_at_the_pace_it_ran():
    """A device whose matmuls ran 25% faster and copies 40% slower for the first third of a
    measurement (as a shared host's did): fitted as measured, the profile is off by that; with
    the probe's trace, each iteration is priced at its pace, the fit recovers the profile and
    predicts every latency."""
    mc, cost, samples = _sim_samples(TRUE)
    third = len(samples) // 3
    compute = np.where(np.arange(len(samples)) < third, 0.75, 1.0)
    memory = np.where(np.arange(len(samples)) < third, 1.4, 1.0)
    paced = _paced(samples, compute, memory)
    terms, measured = design_matrix(cost, paced)
    as_measured = fit_coefficients(terms, measured)
    assert not np.allclose(as_measured, coefficients(TRUE), rtol=0.05)
    assert (np.abs(terms @ as_measured - measured) / measured).max() > 0.01
    trace = PeakTrace.of(paced)
    np.testing.assert_allclose(trace.scales(paced), np.c_[compute, memory], rtol=1e-12)
    assert trace.spread() == pytest.approx({"readings": len(samples), "compute_p10": 0.75,
                                            "compute_p90": 1.0, "memory_p10": 1.0,
                                            "memory_p90": 1.4})
    fitted = fit_profile(replace(TRUE, name="fit"), cost, paced, "fit", "test", trace)
    np.testing.assert_allclose(coefficients(fitted), coefficients(TRUE), rtol=1e-6)
    errors = percentage_errors(CostModel(mc, fitted, 4), paced, trace=trace)
    assert errors.max() < 1e-6
    # An iteration not probed is priced at the median pace; none probed: no trace.
    assert trace.scales([samples[0]]).tolist() == [[1.0, 1.0]]
    assert PeakTrace.of(samples) is None
    # Only a sum-form profile is priced at a pace (a datasheet GPU's overlaps its terms).
    with pytest.raises(ValueError, match="sum-form"):
        percentage_errors(CostModel(mc, "h100-sxm", 2), paced, trace=trace)


def test_the_peak_trace_takes_the_median_of_neighbouring_readings():
    """One reading far off (a probe that met a busy moment) moves no iteration's pace."""
    _, _, samples = _sim_samples(TRUE)
    samples = samples[:40]
    compute = np.ones(len(samples))
    compute[17] = 3.0
    trace = PeakTrace.of(_paced(samples, compute, np.ones(len(samples))))
    assert trace.compute.tolist() == [1.0] * len(samples)


def test_the_peak_probe_times_a_matmul_and_a_copy():
    probe = PeakProbe(torch.device("cpu"))
    before = time.perf_counter()
    at, matmul_s, copy_s = probe()
    assert before < at <= time.perf_counter()
    assert 0 < matmul_s < 1 and 0 < copy_s < 1


def test_reference_speed_is_how_many_times_as_long_and_its_scale_undoes_it():
    """Iterations measured on a machine 1.6x as slow as the reference (5% noise): the speed is
    found, its spread brackets it, and the scale it gives brings the iterations back to the
    reference's pace."""
    mc, cost, samples = _sim_samples(TRUE)
    noise = np.random.default_rng(2).lognormal(0, 0.05, len(samples))
    slow = [replace(s, measured_s=1.6 * s.measured_s * n) for s, n in zip(samples, noise)]
    speed = reference_speed(slow, cost)
    assert speed.reference == "truth" and speed.iterations == len(samples)
    assert speed.speed == pytest.approx(1.6, rel=0.02)
    assert speed.p10 < speed.speed < speed.p90
    assert speed.latency_scale == pytest.approx(1 / speed.speed)
    back = [replace(s, measured_s=s.measured_s * speed.latency_scale) for s in slow]
    assert reference_speed(back, cost).speed == pytest.approx(1.0)
    assert speed.to_json()["override"] == f"backend.latency_scale={speed.latency_scale:.4g}"
    with pytest.raises(ValueError, match="no iterations"):
        reference_speed([], cost)


def test_scaled_latency_runs_the_engine_at_the_scaled_pace():
    """The same requests on the same executor, once as measured and once scaled by 0.4:
    the same schedule, every iteration 0.4 as long on the clock, energy modeled from the
    clock's time following it; runs (priced at once by the inner executor) are not taken."""
    mc = ModelConfig.load("qwen3-moe-tiny")
    cfg = EngineConfig(model=mc.name, prefill_budget=256, kv_cache_tokens=4096)

    def engine(scale: float | None, lengths: tuple[int, ...] = (40, 300, 7)) -> Engine:
        sim = SimExecutor(mc, CostModel(mc, TRUE, 4), "uniform")
        engine = Engine(cfg, executor=sim if scale is None else ScaledLatency(sim, scale),
                        model_config=mc, decide=lambda view: Decision(2, view.fcfs_admission()))
        for n in lengths:
            engine.add_request_of_length(n, 5)
        return engine

    plain, scaled = engine(None), engine(0.4)
    reports, scaled_reports = plain.run(), scaled.run()
    assert [r.stages for r in scaled_reports] == [r.stages for r in reports]
    np.testing.assert_allclose([r.latency_s for r in scaled_reports],
                               [0.4 * r.latency_s for r in reports], rtol=1e-12)
    assert scaled.clock.now() == pytest.approx(0.4 * plain.clock.now())
    assert sum(r.energy_j for r in scaled_reports) < sum(r.energy_j for r in reports)
    # The simulator would price a run at once, unscaled: scaled, each iteration goes alone.
    for scale, runs in ((None, True), (0.4, False)):
        e = engine(scale, (40,))
        start = Decision(2, e.decision_view().fcfs_admission())
        assert (e.step_run(float("inf"), start) is not None) == runs
    for bad in (0, -1.0, float("inf"), float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="latency scale must be a positive number"):
            ScaledLatency(SimExecutor(mc, CostModel(mc, TRUE, 4), "uniform"), bad)


def test_measurement_scatter_is_one_measurements_own_noise_whatever_the_drift():
    """Two passes over the same grid, each iteration measured with its own 5% lognormal noise
    and the second pass 30% slower throughout: the scatter is one measurement's median
    deviation (0.674 x 5%), the drift 1.3."""
    _, _, samples = _sim_samples(TRUE)
    rng = np.random.default_rng(1)

    def measured(factor: float) -> list[Sample]:
        return [replace(s, measured_s=s.measured_s * factor * rng.lognormal(0, 0.05))
                for s in samples]

    two = measured(1.0) + measured(1.3)
    assert pass_drift(two, 2) == pytest.approx(1.3, rel=0.02)
    assert measurement_scatter(two, 2) == pytest.approx(0.674 * 0.05, rel=0.15)
    assert measurement_scatter(two, 1) is None and measurement_scatter(two[:-1], 2) is None


def test_grid_covers_layered_stages_chunks_and_decode():
    _, _, samples = _sim_samples(TRUE)
    stages = {(st.layer_start, st.layer_end) for s in samples for st in s.plan.stages}
    assert {(0, 5), (0, 3), (3, 5), (0, 1), (4, 5)} <= stages  # G = 1, 2, 5 of 5 layers
    assert {s.plan.mode for s in samples} == {"layered", "chunked"}
    assert max(len(s.plan.decode) for s in samples) >= 9


def test_empirical_routing_interpolates_what_was_recorded(tmp_path):
    mc = ModelConfig.load("qwen3-moe-cpu")  # 64 experts, top-8
    skewed = RoutingModel(mc, "zipf:1.0")
    observations = [(r, skewed.distinct(r)) for r in (1, 2, 4, 8, 16, 32, 64, 128, 256) * 3]
    table = record_routing(observations, mc)
    path = tmp_path / "routing.json"
    path.write_text(json.dumps(table))
    empirical = RoutingModel(mc, f"empirical:{path}")
    for rows in (1, 8, 64, 256):
        assert empirical.distinct(rows) == skewed.distinct(rows)
    assert skewed.distinct(16) <= empirical.distinct(24) <= skewed.distinct(32)
    assert empirical.distinct(10_000) <= mc.num_experts
    with pytest.raises(ConfigError, match="recorded for 64 experts"):
        RoutingModel(ModelConfig.load("mixtral-tiny"), f"empirical:{path}")
    with pytest.raises(ConfigError, match="does not exist"):
        RoutingModel(mc, f"empirical:{tmp_path / 'none.json'}")
    for bad in ("zipf:abc", "zipf:-1", "zipf:nan", "zipf:"):
        with pytest.raises(ConfigError, match="exponent S >= 0"):
            RoutingModel(mc, bad)


def test_routing_observations_come_from_moe_layers_only():
    mc, _, samples = _sim_samples(TRUE)
    obs = routing_observations(samples, mc)
    assert obs and all(1 <= d <= mc.num_experts for _, d in obs)
    per_sample = sum(mc.moe_layers)  # layer 2 of qwen3-moe-tiny is dense
    assert len(obs) <= len(samples) * per_sample


class WallPower:
    """An energy counter for a device drawing 37 W whatever it does, stepping every 10 ms of
    the wall clock (this machine has no counter to read)."""

    source = "wall"

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def read(self) -> tuple[float, float]:
        now = time.perf_counter()
        return now, 37.0 * (now - self.t0) // 0.01 * 0.01


@pytest.fixture
def torch_threads():
    """Puts back the process's torch thread count (``--threads`` sets it)."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_calibrate_cli_writes_a_profile_hardware_can_name(tmp_path, monkeypatch, torch_threads):
    """The real engine (tiny model, quick grid, one torch thread): profile and routing table
    written, the report has the fidelity figures, the energy constants are fitted to the
    device's counter (a stand-in here), and the env runs on the sim backend with the profile."""
    import scripts.calibrate
    from scripts.calibrate import main

    monkeypatch.setenv("LPENV_PROFILE_DIR", str(tmp_path / "profiles"))
    monkeypatch.setattr(scripts.calibrate, "energy_counter", lambda *a: WallPower())
    main(["--quick", "--settle-s", "0.2", "--model", "qwen3-moe-tiny", "--device", "cpu", "--out",
          str(tmp_path / "out"), "--energy-s", "0.2", "--threads", "1"])
    report = json.loads((tmp_path / "out" / "cpu-auto.json").read_text())
    profile = resolve_profile("cpu-auto")
    assert profile.source.startswith("lpenv-calibrate") and not profile.overlap
    assert profile.fitted_model == "qwen3-moe-tiny"  # (pricing another model warns)
    assert report["profile"]["name"] == "cpu-auto"
    for key in ("fit_error", "held_out_iteration_error", "held_out_iteration_error_routing_model"):
        assert 0 <= report[key]["median"] <= report[key]["p90"]
        assert report[key]["samples"] > 0
    assert set(report["held_out_episodes"]) == {"layered (paper rule)", "chunked (64)"}
    assert set(report["held_out_speed"]) == set(report["held_out_episodes"])
    assert all(v > 0 for v in report["held_out_speed"].values())
    removed = report["held_out_iteration_error_speed_removed"]
    assert removed["samples"] == report["held_out_iteration_error"]["samples"]
    # Every iteration had the peak probe's reading before it, and the fit priced it at that.
    held_samples = report["held_out_iteration_error"]["samples"]
    assert report["peak_trace"]["readings"] == report["grid_iterations"] + held_samples
    assert report["held_out_iteration_error_paced"]["samples"] == held_samples
    assert report["fit_error_paced"]["samples"] == report["grid_iterations"]
    assert "iterations, at the pace a peak probe read before each" in profile.source
    assert "1 torch thread)" in profile.source and report["torch_threads"] == 1
    # The held-out workload ran at this machine's pace against cpu-generic's (the grid's
    # first pass): arrivals and SLOs stretched alike, on the engine and the simulator.
    workload = report["held_out_workload"]
    pace = CalibrationRecord.read(report["record_path"]).held_out_pace
    assert workload["pace"] == pace > 0 and pace != 1.0
    assert workload["rate"] == pytest.approx(3.0 / pace)
    assert (workload["ttft_slo_s"], workload["tbt_slo_s"]) == pytest.approx((2.0 * pace,
                                                                            0.125 * pace))
    assert (tmp_path / "out" / "cpu-auto_fidelity.png").stat().st_size > 0
    energy = report["energy"]
    assert energy["source"] == "fitted to wall over 5 sustained loads"
    assert len(energy["spans"]) == 5 and all(s["seconds"] >= 0.2 for s in energy["spans"])
    assert profile.energy.name == "cpu-auto-wall"
    assert profile.energy.static_w == pytest.approx(37.0, rel=0.05)  # all of it static power
    assert energy["span_error"]["median"] < 0.05

    # Refit from the record, as on a machine without the device: the same fit and fidelity.
    record = report["record_path"]
    assert record == str(tmp_path / "out" / "cpu-auto_record.json")
    main(["--refit", record, "--name", "refit", "--out", str(tmp_path / "again"),
          "--profile-dir", str(tmp_path / "again")])
    again = json.loads((tmp_path / "again" / "refit.json").read_text())
    for key in ("coefficients", "fit_error", "held_out_iteration_error",
                "held_out_iteration_error_routing_model", "held_out_episodes", "grid",
                "measured_peak_flops", "held_out_speed", "held_out_iteration_error_speed_removed",
                "peak_trace", "fit_error_paced", "held_out_iteration_error_paced",
                "held_out_iteration_error_routing_model_paced", "held_out_workload",
                "torch_threads"):
        assert again[key] == report[key], key
    assert again["record_path"] == record
    assert again["energy"] == {**report["energy"], "name": "refit-wall"}

    # The held-out iterations run again beside grid ones of their kinds, on the real engine:
    # every replayable one, and nothing fitted or installed.
    installed = (tmp_path / "profiles" / "cpu-auto.json").read_text()
    torch.set_num_threads(2)
    main(["--replay", record, "--out", str(tmp_path / "replay")])
    assert torch.get_num_threads() == 1  # the engine as the record measured it
    replayed = json.loads((tmp_path / "replay" / "cpu-auto_replay.json").read_text())
    held = CalibrationRecord.read(record).held_out
    for label, real in held.items():
        rows = replayed["sets"][label]
        assert rows["iterations"] + replayed["not_replayable"][label] == len(real["samples"])
    total = sum(r["iterations"] for label, r in replayed["sets"].items() if label in held)
    assert replayed["held_out_error_grid_speed_removed"]["samples"] == total > 0
    assert all(r["replayed_speed"] > 0 and r["recorded_speed"] > 0
               for r in replayed["sets"].values())
    assert (tmp_path / "profiles" / "cpu-auto.json").read_text() == installed

    # Without an energy counter the profile keeps its datasheet's modeled constants.
    bare = CalibrationRecord.read(record)
    bare.energy_spans, bare.energy_counter = [], None
    main(["--refit", str(bare.write(tmp_path / "bare.json")), "--name", "bare", "--out",
          str(tmp_path / "bare"), "--profile-dir", str(tmp_path / "bare")])
    modeled = json.loads((tmp_path / "bare" / "bare.json").read_text())["energy"]
    assert modeled["source"] == "modeled: cpu-generic constants (no energy counter on cpu)"
    assert modeled["static_w"] == DATASHEET_PROFILES["cpu-generic"].energy.static_w

    import gymnasium as gym

    import lpenv

    env = gym.make(lpenv.ENV_ID, engine={"model": "qwen3-moe-tiny", "prefill_budget": 512,
                                         "kv_cache_tokens": 8192},
                   workload={"num_requests": 6, "scale": 0.05},
                   backend={"name": "sim", "hardware": "cpu-auto",
                            "routing": f"empirical:{report['routing_path']}"})
    summary = play_trivially(env, seed=0)["summary"]
    assert summary["requests_finished"] == 6
    assert summary["energy_source"] == "modeled:cpu-auto-wall"  # the fitted constants


def test_calibrate_speed_measures_against_a_profile_and_installs_nothing(tmp_path, capsys,
                                                                         monkeypatch):
    """``--speed`` (make run's first step): the real engine (tiny model, quick grid) against
    cpu-generic; speed.json carries the override make run passes on; no profile written."""
    from scripts.calibrate import main

    monkeypatch.setenv("LPENV_PROFILE_DIR", str(tmp_path / "profiles"))
    main(["--speed", "--quick", "--model", "qwen3-moe-tiny", "--device", "cpu", "--out",
          str(tmp_path / "out")])
    speed = json.loads((tmp_path / "out" / "speed.json").read_text())
    assert speed["reference"] == "cpu-generic" and speed["model"] == "qwen3-moe-tiny"
    assert speed["iterations"] > 0 and 0 < speed["p10"] <= speed["speed"] <= speed["p90"]
    assert speed["latency_scale"] == pytest.approx(1 / speed["speed"])
    assert speed["override"].startswith("backend.latency_scale=")
    assert "as long as cpu-generic prices them" in capsys.readouterr().out
    assert not (tmp_path / "profiles").exists()
    for args, says in ((["--repeats", "2"], "do not apply"),
                       (["--against", "no-such-profile"], "unknown hardware profile")):
        with pytest.raises(SystemExit) as info:
            main(["--speed", "--quick", "--model", "qwen3-moe-tiny", "--out",
                  str(tmp_path / "again"), *args])
        assert info.value.code == 2 and says in capsys.readouterr().err


def test_calibrate_speed_measures_the_engine_lpenv_eval_overrides_give(tmp_path, capsys):
    """``--speed`` with lpenv-eval's overrides (make run passes RUN_ARGS and RUN_EXTRA) probes
    the model and dtype those runs use, not --model's default; bad overrides are a clear
    error, and overrides without --speed are refused."""
    from scripts.calibrate import main

    main(["--speed", "--quick", "--out", str(tmp_path / "out"), "model=mixtral-tiny",
          "engine.dtype=bfloat16", "engine.device=cpu", "workload.rate=3"])
    speed = json.loads((tmp_path / "out" / "speed.json").read_text())
    assert (speed["model"], speed["dtype"], speed["device"]) == ("mixtral-tiny", "bfloat16",
                                                                 "cpu")
    assert "iterations of mixtral-tiny" in capsys.readouterr().out
    for args, says in ((["--speed", "model=no-such-model"], "lpenv-eval's overrides"),
                       (["--speed", "engine.prefill_budgt=3"], "prefill_budgt"),
                       (["model=mixtral-tiny"], "go with --speed only")):
        with pytest.raises(SystemExit) as info:
            main(["--quick", "--out", str(tmp_path / "again"), *args])
        assert info.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


def test_calibrate_refuses_a_model_the_engine_cannot_run(tmp_path, capsys):
    from scripts.calibrate import main

    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--model", "gpt-oss-20b", "--out", str(tmp_path),
              "--profile-dir", str(tmp_path)])
    assert exc.value.code == 2
    assert "sim backend only" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))  # nothing half-written


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_calibrate_and_replay_say_so_where_the_gpu_is_not(tmp_path, capsys):
    """A GPU measurement (or a GPU record's replay) on a machine without one: a clear error
    before anything is built or written, not torch's assertion."""
    from scripts.calibrate import main

    gpu_record = Path(__file__).parent / "data" / "h200_qwen3-moe-cpu_record.json.gz"
    for args in (["--quick", "--device", "cuda"], ["--quick", "--device", "cuda:1"],
                 ["--replay", str(gpu_record)]):
        with pytest.raises(SystemExit) as exc:
            main([*args, "--out", str(tmp_path / "out"), "--profile-dir", str(tmp_path)])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "but this machine has no CUDA device" in err, err
    assert not list(tmp_path.rglob("*.json"))
    with pytest.raises(SystemExit) as exc:
        main(["--replay", str(gpu_record), "--refit", str(gpu_record)])
    assert exc.value.code == 2 and "--replay runs a record's" in capsys.readouterr().err


def test_refit_refuses_what_is_not_a_record(tmp_path, capsys):
    from scripts.calibrate import main

    bad = tmp_path / "report.json"
    bad.write_text(json.dumps({"name": "cpu-auto"}))
    for path in (bad, tmp_path / "missing.json"):
        with pytest.raises(SystemExit) as exc:
            main(["--refit", str(path), "--out", str(tmp_path / "out"),
                  "--profile-dir", str(tmp_path)])
        assert exc.value.code == 2
        assert "calibration record" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    for extra in (["--quick"], ["--threads", "1"]):
        with pytest.raises(SystemExit) as exc:
            main(["--refit", str(bad), *extra])
        assert exc.value.code == 2 and "--refit measures nothing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--replay", str(bad), "--threads", "1"])
    assert exc.value.code == 2 and "at its thread count" in capsys.readouterr().err
    for args, error in ((["--energy-s", "-1"], "--energy-s must be >= 0"),
                        (["--repeats", "0"], "--repeats must be at least 1"),  # was the default
                        (["--settle-s", "-1"], "--settle-s must be >= 0"),
                        (["--threads", "0"], "--threads must be at least 1")):
        with pytest.raises(SystemExit) as exc:
            main([*args, "--out", str(tmp_path / "out")])
        assert exc.value.code == 2 and error in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_record_keeps_every_plan_the_cost_model_prices(tmp_path):
    """Plans of every shape (decode rows, pieces of a prompt, several stages) survive the
    record's JSON with the same price."""
    from engine_adapter.calibration import Sample
    from engine_adapter.calibration_record import CalibrationRecord

    mc = ModelConfig.load("qwen3-moe-tiny")
    cost = CostModel(mc, "cpu-generic", 4)
    decode = tuple(Segment(f"d{i}", n, 1, (0, 1), True, (5,)) for i, n in enumerate((3, 40)))
    stages = (StageWork(0, 1, 3, 1, 2, (Segment("a", 0, 9, (), False, None),
                                        Segment("b", 16, 5, (2,), True, None))),
              StageWork(1, 0, 2, 0, 1, (Segment("c", 0, 7, (), True, (1,) * 7),)))
    plans = [IterationPlan(4, "layered", mc.num_layers, decode, stages),
             IterationPlan(5, "chunked", mc.num_layers, (), stages[1:]),
             IterationPlan(6, "layered", mc.num_layers, decode, ())]
    samples = [Sample(p, (3,) * mc.num_layers, 0.01 * i + 0.001) for i, p in enumerate(plans)]
    samples[1] = replace(samples[1], probe=(12.5, 0.0031, 0.0007))  # a peak probe's reading
    rec = CalibrationRecord("qwen3-moe-tiny", "cpu", "float32", "test", {}, {}, 0, samples,
                            {"x": {"summary": {"ttft_mean_s": 1.5}, "samples": samples[:1]}})
    back = CalibrationRecord.read(rec.write(tmp_path / "r.json"))
    for a, b in zip(samples + samples[:1], back.grid_samples + back.held_out["x"]["samples"]):
        assert b.plan.schedule_key() == a.plan.schedule_key()
        assert b.distinct_experts == a.distinct_experts and b.measured_s == a.measured_s
        assert b.probe == a.probe
        assert (cost.iteration_latency(b.plan, b.distinct_experts)
                == cost.iteration_latency(a.plan, a.distinct_experts))
    assert back.held_out["x"]["summary"] == {"ttft_mean_s": 1.5}


RECORDS = Path(__file__).parent / "data"


def test_the_h200_records_refit_to_the_figures_the_readme_quotes(tmp_path):
    """Records measured on an H200 (``lpenv-calibrate --device cuda``, float32, qwen3-moe-cpu):
    refit here, they give the README's figures. The one measured without ``--settle-s`` shows
    the drift that setting removes."""
    from scripts.calibrate import main

    main(["--refit", str(RECORDS / "h200_qwen3-moe-cpu_record.json.gz"), "--out",
          str(tmp_path), "--profile-dir", str(tmp_path)])
    settled = json.loads((tmp_path / "cuda-auto.json").read_text())
    assert settled["grid_iterations"] == 1604 and settled["device"] == "cuda"
    assert settled["grid_pass_drift"] == pytest.approx(0.99, abs=0.01)
    assert settled["measurement_scatter"] == pytest.approx(0.072, abs=0.001)
    assert settled["held_out_iteration_error"]["median"] == pytest.approx(0.079, abs=0.002)
    # The held-out runs' speeds against the fit, and the error with them taken out.
    assert list(settled["held_out_speed"].values()) == pytest.approx([0.933, 0.974], abs=0.001)
    assert settled["held_out_iteration_error_speed_removed"]["median"] == pytest.approx(
        0.058, abs=0.002)
    layered = settled["held_out_episodes"]["layered (paper rule)"]
    assert layered["ttft_mean_s_error"] < 0.01 and layered["e2e_mean_s_error"] < 0.05

    main(["--refit", str(RECORDS / "h200_qwen3-moe-cpu_unsettled_record.json.gz"),
          "--name", "unsettled", "--out", str(tmp_path), "--profile-dir", str(tmp_path)])
    unsettled = json.loads((tmp_path / "unsettled.json").read_text())
    assert unsettled["grid_pass_drift"] == pytest.approx(0.77, abs=0.01)
    assert unsettled["measurement_scatter"] == pytest.approx(0.120, abs=0.001)
    assert unsettled["held_out_iteration_error"]["median"] == pytest.approx(0.193, abs=0.002)
    # Its layered run took 1.22x the fitted time, its chunked run 0.87x: most of its error.
    assert list(unsettled["held_out_speed"].values()) == pytest.approx([1.223, 0.873],
                                                                       abs=0.001)
    assert unsettled["held_out_iteration_error_speed_removed"]["median"] == pytest.approx(
        0.085, abs=0.002)


def test_a_probed_cpu_record_refits_to_the_figures_the_readme_quotes(tmp_path):
    """``make calibrate`` on this 2-core host with the peak probe (run B in the README): every
    iteration has its reading, and priced at the pace it ran at, the fit's error and the
    held-out p90 are lower than as measured; the held-out median is not."""
    from scripts.calibrate import main

    main(["--refit", str(RECORDS / "cpu_probed_qwen3-moe-cpu_record.json.gz"), "--out",
          str(tmp_path), "--profile-dir", str(tmp_path)])
    r = json.loads((tmp_path / "cpu-auto.json").read_text())
    assert r["peak_trace"]["readings"] == 1930 == r["grid_iterations"] + r[
        "held_out_iteration_error"]["samples"]
    assert r["peak_trace"]["compute_p10"] == pytest.approx(0.80, abs=0.005)
    assert r["peak_trace"]["memory_p90"] == pytest.approx(1.22, abs=0.005)
    assert r["fit_error"]["median"] == pytest.approx(0.088, abs=0.001)
    assert r["fit_error_paced"]["median"] == pytest.approx(0.065, abs=0.001)
    assert r["held_out_iteration_error"]["median"] == pytest.approx(0.078, abs=0.001)
    assert r["held_out_iteration_error"]["p90"] == pytest.approx(0.325, abs=0.001)
    assert r["held_out_iteration_error_paced"]["median"] == pytest.approx(0.080, abs=0.001)
    assert r["held_out_iteration_error_paced"]["p90"] == pytest.approx(0.164, abs=0.001)
    assert "at the pace a peak probe read before each" in r["profile"]["source"]
    # (from before the held-out workload was stretched to the machine's pace: as set)
    assert r["held_out_workload"]["pace"] is None and r["held_out_workload"]["rate"] == 3.0


def test_the_one_thread_cpu_record_meets_the_target_the_readme_quotes(tmp_path):
    """``make calibrate`` on this 2-core host at one torch thread (run I in the README): the
    held-out median iteration error is under issue 4's 5%, as measured and at the probed
    pace, and the held-out episodes ran at this machine's pace (2.15x cpu-generic's), where
    the paper rule attains every SLO and chunked prefill four in ten, on both sides."""
    from scripts.calibrate import main

    main(["--refit", str(RECORDS / "cpu_one_thread_qwen3-moe-cpu_record.json.gz"), "--out",
          str(tmp_path), "--profile-dir", str(tmp_path)])
    r = json.loads((tmp_path / "cpu-auto.json").read_text())
    assert r["torch_threads"] == 1 and "1 torch thread)" in r["profile"]["source"]
    assert r["measurement_scatter"] == pytest.approx(0.030, abs=0.001)
    assert r["fit_error"]["median"] == pytest.approx(0.033, abs=0.001)
    assert r["held_out_iteration_error"]["samples"] == 406
    for key, median, p90 in (("held_out_iteration_error", 0.038, 0.107),
                             ("held_out_iteration_error_paced", 0.038, 0.103),
                             ("held_out_iteration_error_routing_model", 0.039, 0.110)):
        assert r[key]["median"] == pytest.approx(median, abs=0.001), key
        assert r[key]["p90"] == pytest.approx(p90, abs=0.001), key
        assert r[key]["median"] <= 0.05
    workload = r["held_out_workload"]
    assert workload["pace"] == pytest.approx(2.149, abs=0.001)
    assert workload["rate"] == pytest.approx(1.396, abs=0.001)
    episodes = r["held_out_episodes"]
    layered, chunked = episodes["layered (paper rule)"], episodes["chunked (64)"]
    assert layered["slo_attainment_measured"] == layered["slo_attainment_simulated"] == 1.0
    assert chunked["slo_attainment_measured"] == pytest.approx(10 / 24)
    assert chunked["slo_attainment_simulated"] == pytest.approx(11 / 24)
    for x in (layered, chunked):
        assert x["ttft_mean_s_error"] == pytest.approx(0.041, abs=0.001)


def test_the_h200_nvml_record_refits_the_energy_its_counter_measured(tmp_path):
    """A record measured on an H200 with NVML's counter (2026-11-29, ``--repeats 1
    --energy-s 3``): its five sustained loads refit here to the constants the README quotes,
    each load's joules predicted to within a few percent, and the profile it installs names
    its energy after the counter."""
    from scripts.calibrate import main

    main(["--refit", str(RECORDS / "h200_nvml_qwen3-moe-cpu_record.json.gz"), "--out",
          str(tmp_path), "--profile-dir", str(tmp_path / "profiles")])
    report = json.loads((tmp_path / "cuda-auto.json").read_text())
    energy = report["energy"]
    assert energy["source"] == "fitted to nvml over 5 sustained loads"
    assert energy["static_w"] == pytest.approx(129.6, abs=0.1)
    assert energy["j_per_byte"] == pytest.approx(270.8e-12, abs=0.1e-12)
    assert energy["j_per_flop"] == pytest.approx(30.8e-12, abs=0.1e-12)
    assert energy["span_error"]["median"] < 0.01 and energy["span_error"]["p90"] < 0.025
    # Idle, the card drew 82 W (nvidia-smi, same run); the fitted static power is the busy
    # card's floor, above idle and below the heaviest load's mean (474 J over 3.17 s).
    assert 82 < energy["static_w"] < 474 / 3.17
    profile = json.loads((tmp_path / "profiles" / "cuda-auto.json").read_text())
    assert profile["energy"]["name"] == "cuda-auto-nvml"
    assert report["grid_iterations"] == 802
    assert report["held_out_iteration_error"]["median"] == pytest.approx(0.097, abs=0.002)
