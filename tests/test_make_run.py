"""`make run`, the main job, end to end on a small workload: the speed probe, every policy's
sweep on the real engine at the reference machine's pace, one rate at a time, the table and
the plots. The model comes from RUN_EXTRA, as a user's would, and the probe must measure that
one."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_run_measures_the_speed_then_runs_every_policy_at_that_pace(tmp_path):
    prefix = Path(sys.prefix)  # this environment's tools, installed already: nothing to set up
    out = tmp_path / "main"
    run = subprocess.run(
        ["make", "-o", str(prefix / ".installed"), "run", f"VENV={prefix}", f"RUN_DIR={out}",
         "RUN_RATES=10,20", f"LEARNED={tmp_path / 'none'}", "RUN_EXTRA=model=qwen3-moe-tiny",
         "RUN_GROUPS=1,4", "RUN_SEEDS=0,1", f"VLLM_VENV={prefix}",
         "RUN_ARGS=workload=arxiv4k workload.scale=0.02 workload.num_requests=3 "
         "workload.max_output=4 progress=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    speed = json.loads((out / "speed.json").read_text())
    assert speed["reference"] == "cpu-generic" and speed["latency_scale"] > 0
    assert speed["model"] == "qwen3-moe-tiny"  # the runs' model, not the default's
    assert (out / "speed.args").read_text().strip() == speed["override"]
    scale = float(speed["override"].split("=")[1])
    assert f"measured x{scale:.3g}" in run.stdout  # the table's heading says how it was run
    assert f"(measured x{scale:.3g}: each measured latency times that" in run.stdout
    assert "no learned policy at" in run.stdout
    if importlib.util.find_spec("vllm") is None:  # (tests/test_vllm.py runs it with vLLM)
        assert "its chunked baseline skipped" in run.stdout
    with (out / "goodput.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["policy"] for r in rows) == [
        "chunked", "fixed groups=1", "fixed groups=4", "paper", "slo_aware"]
    assert {r["latency"] for r in rows} == {f"measured x{scale:.3g}"}
    # Every policy at a rate before any at the next: side by side as the machine drifts.
    runs = {path.parent.name: path.stat().st_mtime for path in out.glob("*/summary.json")}
    assert sorted(runs) == sorted(f"{name}-{rate}-s{seed}" for rate in (10.0, 20.0)
                                  for name in ("chunked", "paper", "slo_aware", "fixed-1",
                                               "fixed-4") for seed in (0, 1))
    assert max(t for name, t in runs.items() if "-10.0-" in name) < min(
        t for name, t in runs.items() if "-20.0-" in name)
    for plot in ("attainment_vs_rate.png", "ttft_cdf.png", "tbt_cdf.png"):
        assert (out / plot).stat().st_size > 0
