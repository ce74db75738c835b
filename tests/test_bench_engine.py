"""The engine benchmark runs end to end and writes the fields the README promises.
(A smoke test on the tiny model: the figures themselves are not judged here.)"""

from __future__ import annotations

import json

import pytest
import torch

from scripts.bench_engine import main

REQUIRED = ("model", "device", "prompt_tokens", "chunk_tokens", "expert_bytes_chunked",
            "expert_bytes_layered", "expert_traffic_ratio")
PER_MODE = ("iteration_latency_p50_s", "iteration_latency_p99_s", "ttft_mean_s", "tbt_p99_s",
            "end_to_end_s", "energy_per_token_j", "energy_source")


def test_quick_bench_writes_json_and_plots(tmp_path):
    out = tmp_path / "bench.json"
    main(["--quick", "--out", str(out), "--plots", str(tmp_path)])
    result = json.loads(out.read_text())
    for key in REQUIRED:
        assert key in result, key
    for mode in ("chunked", "layered"):
        for key in PER_MODE:
            assert key in result["modes"][mode], (mode, key)
        assert result["modes"][mode]["requests_finished"] == result["workload"]["num_requests"]
    # Layered prefill reads each expert once per prompt piece; chunks re-read them.
    assert result["expert_bytes_chunked"] > result["expert_bytes_layered"]
    assert (tmp_path / "ttft_tbt_cdf.png").stat().st_size > 0
    assert (tmp_path / "iteration_latency.png").stat().st_size > 0


def test_bench_refuses_what_the_engine_cannot_run(tmp_path, capsys):
    """A model the torch engine does not implement, or (without CUDA) a GPU: exit 2 with the
    reason, before anything runs or is written."""
    cases = [(["--model", "gpt-oss-20b"], "runs on the sim backend only")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "but this machine has no CUDA device"))
    for args, reason in cases:
        with pytest.raises(SystemExit) as exc:
            main([*args, "--quick", "--out", str(tmp_path / "bench.json")])
        assert exc.value.code == 2 and reason in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
