"""lpenv-sweep-report and lpenv-paper report what was run: one line per distinct setting (only
seeds are averaged), the requests the summaries count, and nothing of an earlier call."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from scripts import sweep_report
from scripts.evaluate import CONFIG_DIR, evaluate

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model=qwen3-moe-tiny", "backend.name=sim", "workload.num_requests=6",
        "progress=false"]


def run(out: Path, overrides=()) -> dict:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return evaluate(compose("evaluate", overrides=[*TINY, *overrides]), out)


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def warm_run(tmp_path_factory) -> Path:
    """One run whose first requests arrive during a warm-up its summary leaves out."""
    folder = tmp_path_factory.mktemp("warm")
    summary = run(folder / "run", ["policy=chunked", "workload.num_requests=12",
                                   "workload.rate=4", "workload.warmup_s=1.0"])
    assert summary["requests_warmup"] > 0
    return folder


def test_runs_of_other_settings_are_lines_of_their_own(tmp_path, capsys):
    """A sweep over an engine setting and seeds: one line per chunk size, the seeds of each
    averaged, never the two chunk sizes (they were reported as one "chunked" line)."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.evaluate", "-m", *TINY, "policy=chunked",
         "engine.chunk_tokens=32,256", "seed=0,1", "workload.rate=3",
         "hydra.launcher.n_jobs=1", f"hydra.sweep.dir={sweep}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sweep_report.main([str(sweep), "--out", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out
    goodput = {r["policy"]: r for r in read_csv(tmp_path / "report" / "goodput.csv")}
    assert set(goodput) == {"chunked engine.chunk_tokens=32", "chunked engine.chunk_tokens=256"}
    runs = read_csv(tmp_path / "report" / "runs.csv")
    for line, row in goodput.items():
        mine = [float(r["slo_attainment"]) for r in runs if r["line"] == line]
        assert len(mine) == 2  # the two seeds
        assert float(row["attainment"]) == pytest.approx(np.mean(mine), abs=1e-3)
        assert f"{line:<33}     3     2" in printed  # its own row of the table: rate 3, 2 runs


def test_runs_without_a_hydra_config_are_told_apart_by_their_summaries(tmp_path):
    for warmup in (0, 1):
        run(tmp_path / f"w{warmup}", ["policy=chunked", f"workload.warmup_s={warmup}"])
    rows = sweep_report.goodput_rows(sweep_report.load_runs([tmp_path]))
    assert {r["policy"] for r in rows} == {"chunked workload.warmup_s=0.0",
                                          "chunked workload.warmup_s=1.0"}


def test_cdfs_count_the_requests_the_summary_counts(warm_run, monkeypatch, tmp_path):
    """Warm-up requests are out of the CDFs as they are out of summary.json."""
    drawn = []
    monkeypatch.setattr(sweep_report, "_cdf",
                        lambda ax, values, label, **style: drawn.append(values))
    (summary,) = sweep_report.load_runs([warm_run])
    sweep_report.plot_cdfs([summary], tmp_path / "ttft.png", tmp_path / "tbt.png")
    ttfts, gaps_ms = drawn
    assert ttfts.size == summary["requests_total"]  # all finish, so each has a TTFT
    assert np.percentile(ttfts, 90) == pytest.approx(summary["ttft_p90_s"], abs=1e-5)
    assert np.percentile(gaps_ms, 99) == pytest.approx(summary["tbt_p99_s"] * 1e3, abs=1e-2)


def test_out_that_is_a_file_is_a_usage_error(warm_run, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("")
    for out in (taken, taken / "report"):
        with pytest.raises(SystemExit) as exc:
            sweep_report.main([str(warm_run), "--out", str(out)])
        assert exc.value.code == 2
        assert f"{taken} is a file, not a folder" in capsys.readouterr().err


def test_paper_panel_reports_only_this_calls_runs(tmp_path, capsys):
    """A second call with other rates into the same --out: its table, goodput, figure and
    panel.json are its own runs' (the first call's 2.9 runs were mixed in)."""
    from scripts.paper_panel import run_panel

    for rate in (2.9, 2.1):
        saved = run_panel("arxiv-gptoss", tmp_path, jobs=1, duration_s=8, warmup_s=2,
                          hardware="h100-sxm-tp2", rates=(rate,))
    folder = tmp_path / "arxiv-gptoss"
    assert {r["rates"] for r in read_csv(folder / "goodput.csv")} == {"2.1"}
    assert {r["rate"] for r in read_csv(folder / "runs.csv")} == {"2.1"}
    assert saved == json.loads((folder / "panel.json").read_text())
    assert {r["rate"] for r in saved["runs"]} == {2.1}
    assert {(g["rates"], g["goodput_rate"]) for g in saved["goodput"]} <= {("2.1", 2.1),
                                                                          ("2.1", None)}
    assert saved["rates"] == [2.1]  # the rates run, not the panel's
    assert (folder / "chunked-2.9" / "summary.json").is_file()  # left there, and said so
    assert "left out the runs of an earlier call: chunked-2.9, paper-2.9" in (
        capsys.readouterr().out)


def test_the_goodput_line_rounds_the_attainment_the_table_rounds():
    """61/83 = 73.49%: both tables say 73% (the goodput line rounded the CSV's 0.735)."""
    from scripts.sweep_report import format_tables, goodput_rows

    run = {"policy": "chunked", "line": "chunked", "rate": 1.5, "workload": "arxiv",
           "model": "m", "engine": "sim", "latency": "x", "ttft_slo_s": 10.0,
           "tbt_slo_s": 0.125, "slo_attainment": 61 / 83, "ttft_attainment": 1.0,
           "tbt_attainment": 61 / 83, "ttft_p90_s": 1.0, "tbt_p99_s": 0.1, "e2e_mean_s": 2.0,
           "energy_per_token_j": 0.03, "expert_bytes": 1e9, "wall_time_s": 1.0}
    text = format_tables([run], goodput_rows([run]))
    assert "1.5: 73%" in text and "74%" not in text
