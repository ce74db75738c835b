"""lpenv-eval writes summary.json and requests.csv; a multirun through the joblib launcher and
the sweep report give the figure, the CDFs and the goodput table; lpenv-train exports a policy
that lpenv-eval runs. On the tiny model with modeled latency (fast, reproducible)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from engine_adapter.model_config import ModelConfig
from engine_adapter.scaled_latency import ScaledLatency
from lpenv.backends import build_executor
from lpenv.metrics import RequestRecord
from scripts import sweep_report
from scripts.evaluate import (
    CONFIG_DIR,
    CSV_COLUMNS,
    SUMMARY_FIELDS,
    ConfigProblem,
    build,
    evaluate,
)

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model=qwen3-moe-tiny", "backend.latency=modeled", "workload.num_requests=6",
        "progress=false"]


def load(overrides=(), name="evaluate"):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(name, overrides=[*TINY, *overrides])


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_single_run_writes_summary_and_requests(tmp_path):
    summary = evaluate(load(["policy=paper", "workload.rate=3"]), tmp_path)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    for key in SUMMARY_FIELDS:
        assert key in on_disk, key
    assert (on_disk["policy"], on_disk["engine"], on_disk["model"], on_disk["workload"],
            on_disk["rate"]) == ("paper", "torch", "qwen3-moe-tiny", "arxiv4k", 3.0)
    assert on_disk["requests_total"] == on_disk["requests_finished"] == 6
    assert on_disk["requests_rejected"] == 0
    assert 0.0 <= on_disk["slo_attainment"] <= on_disk["ttft_attainment"] <= 1.0
    assert on_disk["ttft_p50_s"] <= on_disk["ttft_p90_s"] <= on_disk["ttft_p99_s"]
    assert on_disk["energy_source"] == "modeled:cpu-generic"
    assert on_disk["expert_bytes"] > 0 and on_disk["total_bytes"] >= on_disk["expert_bytes"]
    assert on_disk["sim_time_s"] > 0 and on_disk["wall_time_s"] > 0

    rows = read_csv(tmp_path / "requests.csv")
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 6
    for row in rows:
        times = [float(t) for t in row["token_times_s"].split()]
        assert len(times) == int(row["generated_tokens"]) == int(row["output_tokens"])
        assert float(row["first_token_s"]) == times[0] >= float(row["arrival_s"])
        assert int(row["prompt_tokens"]) > 0 and times == sorted(times)
    # The CSV's requests give back the summary's figures (the report rebuilds them so).
    recs = sweep_report.read_requests(tmp_path)
    assert math.isclose(max(r.ttft for r in recs), max(float(r["ttft_s"]) for r in rows),
                        abs_tol=1e-5)
    assert sum(r.attains(2.0, 0.125) for r in recs) / 6 == pytest.approx(
        on_disk["slo_attainment"])


def test_a_scaled_measured_run_says_so(tmp_path):
    """``backend.latency_scale`` (make run's speed against cpu-generic) reaches the executor
    and the summary, whose latency label keeps such runs apart in a sweep report."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("evaluate", overrides=[
            "model=qwen3-moe-tiny", "workload.num_requests=2", "progress=false",
            "backend.latency_scale=0.5"])
    summary = evaluate(cfg, tmp_path)
    assert (summary["latency"], summary["latency_scale"]) == ("measured x0.5", 0.5)
    assert summary["requests_finished"] == 2
    setup = build(cfg)
    executor = build_executor(setup.backend, setup.engine, ModelConfig.load(setup.engine.model))
    assert isinstance(executor, ScaledLatency) and executor.scale == 0.5


def test_modeled_runs_repeat_exactly(tmp_path):
    a = evaluate(load(["policy=slo_aware"]), tmp_path / "a")
    b = evaluate(load(["policy=slo_aware"]), tmp_path / "b")
    a.pop("wall_time_s"), b.pop("wall_time_s")
    assert a == b
    assert (tmp_path / "a" / "requests.csv").read_text() == (
        tmp_path / "b" / "requests.csv").read_text()


def test_chunked_run_uses_chunked_mode(tmp_path):
    summary = evaluate(load(["policy=chunked", "policy.chunk_tokens=32"]), tmp_path)
    assert summary["mode"] == "chunked" and summary["policy_params"] == {"chunk_tokens": 32}
    assert summary["decisions"] == 0  # the engine admits first come, first served itself


@pytest.mark.parametrize("overrides, cap", [
    (["policy=paper"], 1), (["policy=fixed"], 1), (["policy=fixed", "policy.staggered=true"], None),
    (["policy=slo_aware"], None), (["policy=slo_aware", "engine.max_batches_in_flight=2"], 2),
    (["policy=paper", "engine.max_batches_in_flight=3"], 1)])
def test_the_engine_keeps_the_policys_batches_in_flight_cap(overrides, cap):
    # A policy that starts no batch while one is in flight says so; the engine enforces the
    # tighter of that and the config's cap, and does not ask the policy meanwhile.
    assert build(load(overrides)).engine.max_batches_in_flight == cap


def test_command_line_run_writes_into_the_hydra_run_dir(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "scripts.evaluate", *TINY, "policy=fixed",
                           "policy.groups=2", f"hydra.run.dir={out}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "fixed groups=2 @ 4 req/s: attainment" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["policy"] == "fixed groups=2" and summary["policy_params"]["groups"] == 2
    assert (out / "requests.csv").is_file() and (out / ".hydra" / "config.yaml").is_file()


def test_multirun_and_sweep_report(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.evaluate", "-m", *TINY, "policy=fixed",
         "policy.groups=1,4", "workload.rate=2", "hydra.launcher.n_jobs=2",
         f"hydra.sweep.dir={sweep}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 2
    assert {json.loads(p.read_text())["policy"] for p in summaries} == {
        "fixed groups=1", "fixed groups=4"}

    report = tmp_path / "report"
    assert sweep_report.main([str(sweep), "--out", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "goodput: highest request rate with SLO attainment >= 90%" in printed
    for name in ("attainment_vs_rate.png", "ttft_cdf.png", "tbt_cdf.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    goodput = read_csv(report / "goodput.csv")
    assert {r["policy"] for r in goodput} == {"fixed groups=1", "fixed groups=4"}
    for row in goodput:  # the tiny model meets the CPU SLOs easily
        assert row["goodput_rate"] == "2.0" and row["rates"] == "2"
    assert len(read_csv(report / "runs.csv")) == 2


def test_goodput_is_the_highest_rate_meeting_the_target():
    assert sweep_report.goodput({1.0: 1.0, 2.0: 0.95, 3.0: 0.6}) == 2.0
    assert sweep_report.goodput({1.0: 0.5, 2.0: 0.2}) is None
    assert sweep_report.goodput({2.0: 0.9, 1.0: 1.0}, target=0.9) == 2.0  # (any order)


def test_goodput_stops_at_the_first_rate_that_misses():
    # One seed per rate: a curve can dip and recover. The rate after the dip is not served
    # with every rate below it, so it is not the goodput.
    assert sweep_report.goodput({1.0: 0.89, 2.0: 0.9}, target=0.9) is None
    assert sweep_report.goodput({1.0: 0.95, 2.0: 0.7, 3.0: 0.92}) == 1.0
    assert sweep_report.goodput({1.0: 0.95, 2.0: float("nan")}) == 1.0


def test_report_rebuilds_request_records(tmp_path):
    (tmp_path / "requests.csv").write_text(
        ",".join(("request_id", "arrival_s", "first_token_s", "ttft_s", "prompt_tokens",
                  "output_tokens", "generated_tokens", "finished", "rejected", "attained",
                  "token_times_s")) + "\n"
        "r0,1.0,1.5,0.5,10,3,3,1,0,1,1.5 1.6 1.8\n")
    (rec,) = sweep_report.read_requests(tmp_path)
    assert isinstance(rec, RequestRecord) and rec.finished
    assert rec.ttft == pytest.approx(0.5)
    assert rec.tbt_gaps.tolist() == pytest.approx([0.1, 0.2])


def test_report_without_runs_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no lpenv-eval summary.json"):
        sweep_report.main([str(tmp_path)])


def test_train_exports_a_policy_that_evaluates(tmp_path):
    pytest.importorskip("sb3_contrib")
    from scripts.train import train

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[
            "model=qwen3-moe-tiny", "workload.num_requests=4", "train.total_timesteps=64",
            "train.eval_freq=null", "train.eval_episodes=1", "train.progress_bar=false",
            "train.tensorboard=false", "+train.hyperparams.n_steps=32",
            "+train.hyperparams.batch_size=32", "+train.hyperparams.n_epochs=1",
            f"train.export_path={tmp_path / 'published'}"])
    result = train(cfg, tmp_path / "run")
    assert result["algo"] == "maskable_ppo" and result["total_timesteps"] >= 64
    assert (tmp_path / "published" / "policy.json").is_file()
    summary = evaluate(load(["policy=learned", f"policy.path={tmp_path / 'published'}"]),
                       tmp_path / "eval")
    assert summary["policy"] == "learned" and summary["requests_finished"] == 6


def test_a_cdf_is_drawn_through_its_own_steps_both_ends_kept():
    """Millions of TBT gaps are drawn through at most 2,000 points of the exact empirical CDF,
    so a paper panel's report takes seconds, not a minute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.random.default_rng(0).exponential(size=300_001)
    values[7] = np.nan  # not finite: left out
    fig, ax = plt.subplots()
    sweep_report._cdf(ax, values, "x")
    sweep_report._cdf(ax, values[:50], "few")
    (many, few) = ax.get_lines()
    xs, ys = many.get_data()
    finite = np.sort(values[np.isfinite(values)])
    assert len(xs) <= 2000 and xs[0] == finite[0] and xs[-1] == finite[-1] and ys[-1] == 1.0
    # every point drawn is on the exact CDF: F(x) = (rank of x) / n
    assert np.array_equal(ys, (np.searchsorted(finite, xs, side="right")) / finite.size)
    assert len(few.get_data()[0]) == 49  # small samples are drawn whole
    plt.close(fig)


def test_a_simulated_engine_its_devices_cannot_hold_is_a_config_problem():
    """The paper's engine on one H100 (it needs two): refused before anything runs, saying
    what would fit."""
    with pytest.raises(ConfigProblem, match=r"at most 111,244, or use more devices"):
        build(load(["backend.name=sim", "model=qwen3-30b-a3b", "engine=paper", "hardware=h100",
                    "engine.device=cpu"]))
    assert build(load(["backend.name=sim", "model=qwen3-30b-a3b", "engine=paper",
                       "hardware=h100", "engine.device=cpu",
                       "backend.hardware=h100-sxm-tp2"])).engine.kv_cache_tokens == 262144
