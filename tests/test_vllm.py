"""vLLM, a serving engine no one here wrote, as the reference and the chunked baseline.

With vLLM installed (``make test-vllm``: a virtual environment of its own, as ``.ci/run``
makes it): the engine's greedy tokens and their log-probabilities against vLLM's on the same
weights, in chunked and layered mode with requests batched together; and ``lpenv-eval
policy=chunked backend.name=vllm`` serving a workload. Without vLLM those are skipped; the
errors a user meets without it, or with a layered policy, are checked either way.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from engine_adapter.clock import VirtualClock
from engine_adapter.config import EngineConfig
from engine_adapter.engine import Engine
from engine_adapter.errors import ConfigError
from engine_adapter.model_config import ModelConfig
from engine_adapter.weights import dummy_weights, save_safetensors
from lpenv.backends import BackendConfig, check_backend
from lpenv.metrics import MetricsRecorder
from policies.fixed import FixedGroups
from policies.paper_rule import PaperRule
from scripts.evaluate import CONFIG_DIR, ConfigProblem, build, evaluate
from tests.greedy_outputs import greedy_outputs

ROOT = Path(__file__).resolve().parent.parent
MAX_TOKENS = 24
PROMPT_LENS = (37, 90, 128, 200)
LOGPROB_TOL = 1e-4


def has_vllm() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


needs_vllm = pytest.mark.skipif(not has_vllm(), reason="vLLM is not installed here "
                                "(make test-vllm installs it in .venv-vllm and runs these)")


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """Qwen3-MoE small enough to be quick, with a head size vLLM's CPU attention takes (32;
    qwen3-moe-tiny's 16 it refuses): a Hugging Face folder of seeded random weights."""
    hf = {**ModelConfig.load("qwen3-moe-tiny").hf_config, "head_dim": 32, "num_hidden_layers": 4,
          "mlp_only_layers": [1]}
    config = ModelConfig.from_hf_dict(hf, "qwen3-moe-small")
    weights = dummy_weights(config, torch.float32, torch.device("cpu"), seed=1234)
    return save_safetensors(config, weights, tmp_path_factory.mktemp("qwen3-moe-small"))


def engine_config(folder: Path, mode: str) -> EngineConfig:
    return EngineConfig(model=str(folder), weights=str(folder), mode=mode, chunk_tokens=64,
                        kv_cache_tokens=4096, max_model_len=512, max_num_seqs=8)


@pytest.fixture(scope="module")
def served(small_model):
    from engine_adapter.vllm_engine import VllmEngine

    config = engine_config(small_model, "chunked")
    return VllmEngine(config, ModelConfig.load(str(small_model)))


def prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def engine_tokens(folder: Path, mode: str, policy, batch: list[list[int]]
                  ) -> tuple[list[list[int]], list[torch.Tensor]]:
    """The engine's greedy tokens for ``batch`` (queued together) and the log-softmax of the
    logits each came from."""
    tokens, logits = greedy_outputs(Engine(engine_config(folder, mode), decide=policy), batch,
                                    MAX_TOKENS)
    return tokens, [torch.log_softmax(lg.double(), -1) for lg in logits]


@needs_vllm
@pytest.mark.parametrize("mode,policy", [
    ("chunked", None),
    ("layered", FixedGroups(groups=2)),
    ("layered", PaperRule(unit=32)),
], ids=["chunked-64", "layered-G2", "layered-paper"])
def test_greedy_tokens_and_log_probabilities_are_vllms(small_model, served, mode, policy):
    batch = prompts(served.model_config.vocab_size)
    reference = served.generate(batch, MAX_TOKENS, logprobs=1)
    tokens, logprobs = engine_tokens(small_model, mode, policy, batch)
    for ours, lp, (theirs, their_lp) in zip(tokens, logprobs, reference):
        assert ours == theirs, "greedy tokens differ from vLLM's"
        # vLLM reports each chosen token's log-probability: the engine's must agree.
        diff = max(abs(lp[i, t].item() - their_lp[i][t]) for i, t in enumerate(theirs))
        assert diff <= LOGPROB_TOL, f"log-probability differs from vLLM's by {diff:.2e}"


@needs_vllm
def test_serving_on_the_virtual_clock_counts_every_token_and_rejects_too_long(served):
    vocab = served.model_config.vocab_size
    batch = prompts(vocab)
    too_long = [1] * 500  # (500 + 24 tokens > max_model_len 512)
    arrivals = [("a", 0.0, batch[0], 8), ("b", 0.01, too_long, MAX_TOKENS),
                ("c", 0.02, batch[1], 5), ("d", 30.0, batch[2], 3)]
    recorder, clock = MetricsRecorder(), VirtualClock()
    served.serve(arrivals, recorder, clock)
    recs = recorder.requests
    assert [len(recs[r].token_times) for r in "acd"] == [8, 5, 3]
    assert recs["b"].rejected and not recs["b"].token_times
    for r in "acd":
        times = recs[r].token_times
        assert times == sorted(times) and times[0] > recs[r].arrival_time
    # Idle from c's last token to d's arrival: the clock jumped, d's wait is its own steps'.
    assert recs["d"].ttft < 5.0 and clock.now() > 30.0
    assert not served.engine.has_unfinished_requests()
    s = recorder.summary()
    assert s["requests_finished"] == 3 and s["requests_rejected"] == 1


@needs_vllm
def test_a_horizon_stops_serving_and_frees_vllm(served):
    arrivals = [("h1", 0.0, [3] * 50, 200), ("h2", 0.0, [4] * 60, 200)]
    recorder = MetricsRecorder()
    served.serve(arrivals, recorder, VirtualClock(), horizon_s=0.05)
    assert not served.engine.has_unfinished_requests()  # aborted, nothing held
    assert all(not r.finished for r in recorder.requests.values())
    assert recorder.summary()["requests_finished"] == 0


def vllm_run(small_model: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("evaluate", overrides=[
            f"engine.model={small_model}", f"engine.weights={small_model}",
            "engine.kv_cache_tokens=4096", "engine.max_model_len=512", "engine.max_num_seqs=8",
            "workload.num_requests=8", "workload.max_output=12", "progress=false",
            "policy=chunked", "backend.name=vllm", *overrides])


@needs_vllm
def test_lpenv_eval_on_vllm_serves_the_episodes_workload(small_model, tmp_path):
    summary = evaluate(vllm_run(small_model, "workload.rate=4"), tmp_path)
    assert summary["engine"] == "vllm" and summary["mode"] == "chunked"
    assert summary["policy"] == "chunked (vLLM)"  # (apart from the engine's own in a report)
    assert summary["requests_finished"] == summary["requests_total"] == 8
    # vLLM's bytes from its steps' plans, their energy from the CPU's model, as the engine's.
    assert summary["energy_source"] == "modeled:cpu-generic"
    assert summary["energy_per_token_j"] > 0 and summary["expert_bytes"] > 0
    assert json.loads((tmp_path / "summary.json").read_text())["engine"] == "vllm"
    with (tmp_path / "requests.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    # The same requests as the engine's episode draws from the seed (lengths, arrivals).
    ours = evaluate(vllm_run(small_model, "workload.rate=4", "backend.name=torch",
                             "backend.latency=modeled"), tmp_path / "torch")
    with (tmp_path / "torch" / "requests.csv").open(newline="") as f:
        torch_rows = list(csv.DictReader(f))
    key = ("request_id", "arrival_s", "prompt_tokens", "output_tokens", "generated_tokens")
    assert [[r[k] for k in key] for r in rows] == [[r[k] for k in key] for r in torch_rows]
    assert ours["requests_finished"] == 8


@needs_vllm
@pytest.mark.parametrize("kv_tokens", [8192, 1152], ids=["kv-ample", "kv-tight"])
def test_the_engines_chunked_schedule_is_vllms_step_for_step(small_model, tmp_path, kv_tokens):
    """vLLM's scheduler, each step priced by the cost model (backend.latency=modeled),
    against the engine's chunked mode on the simulator with the same cost model: the same
    steps, so every token at the same time. 60 requests arriving at 200 req/s queue up; with
    the tight cache new requests wait for room for their whole prompt (vLLM's admission)."""
    common = ["workload.rate=200", "workload.num_requests=60", "workload.scale=0.1",
              "workload.max_prompt=400", "engine.block_size=32",
              f"engine.kv_cache_tokens={kv_tokens}", "engine.max_num_seqs=16"]
    theirs = evaluate(vllm_run(small_model, *common, "backend.latency=modeled"),
                      tmp_path / "vllm")
    ours = evaluate(vllm_run(small_model, *common, "backend.name=sim",
                             "backend.latency_noise=false"), tmp_path / "sim")
    assert theirs["iterations"] == ours["iterations"] > 200
    assert theirs["requests_finished"] == ours["requests_finished"] == 60
    # (they queued: alone, a prompt's few chunks take some 10 ms at this pace)
    assert theirs["ttft_p50_s"] > 0.1
    times = []
    for run in ("vllm", "sim"):
        with (tmp_path / run / "requests.csv").open(newline="") as f:
            times.append([(r["request_id"], r["token_times_s"]) for r in csv.DictReader(f)])
    assert times[0] == times[1]


class PlanRecorder:
    """Wraps an executor and keeps every plan it runs."""

    def __init__(self, inner) -> None:
        self.inner, self.device, self.plans = inner, inner.device, []

    def execute(self, plan):
        self.plans.append(plan)
        return self.inner.execute(plan)


def steps(plans) -> list[tuple]:
    """Each plan's decode rows and prefill pieces (request, first position, tokens)."""
    return [([(s.request_id, s.start, s.length) for s in p.decode],
             [(s.request_id, s.start, s.length) for st in p.stages for s in st.segments])
            for p in plans]


@needs_vllm
def test_with_preemption_too_the_schedule_is_vllms(small_model):
    """A KV cache of 640 tokens (20 blocks of 32) for 60 requests: running requests run out
    of blocks and are preempted to recompute later; vLLM and the engine preempt the same
    ones at the same steps, plan for plan."""
    from engine_adapter.cost_model import CostModel
    from engine_adapter.executor_sim import SimExecutor
    from engine_adapter.vllm_engine import VllmEngine
    from lpenv.workload import WorkloadConfig, generate

    config = EngineConfig(model=str(small_model), weights=str(small_model), mode="chunked",
                          kv_cache_tokens=640, block_size=32, max_model_len=512,
                          max_num_seqs=16, chunk_tokens=64)
    model = ModelConfig.load(str(small_model))
    rng = np.random.default_rng(0)
    requests = generate(WorkloadConfig(lengths="arxiv4k", scale=0.1, rate=200,
                                       num_requests=60, max_output=12, max_prompt=400), rng)
    arrivals = [(r.request_id, r.arrival_time, rng.integers(0, model.vocab_size,
                                                            r.prompt_tokens).tolist(),
                 r.output_tokens) for r in requests]
    cost = CostModel(model)
    theirs = VllmEngine(config, model).serve(arrivals, MetricsRecorder(), VirtualClock(),
                                             cost=cost)
    executor = PlanRecorder(SimExecutor(model, CostModel(model), noise=False))
    engine = Engine(config, executor=executor, clock=VirtualClock(), model_config=model)
    pending = list(arrivals)
    while pending or engine.has_unfinished():
        while pending and pending[0][1] <= engine.clock.now():
            rid, at, prompt, n = pending.pop(0)
            engine.add_request(prompt, n, rid, at)
        if engine.step(None) is None:
            engine.clock.advance_to(pending[0][1])
    assert steps(theirs) == steps(executor.plans)
    # Requests did restart from position 0 after holding KV: preempted, recomputed.
    starts: dict[str, list[int]] = {}
    for _, pieces in steps(theirs):
        for rid, start, _ in pieces:
            starts.setdefault(rid, []).append(start)
    assert sum(1 for s in starts.values() if s.count(0) > 1) >= 3


def test_vllm_refuses_layered_prefill(small_model):
    with pytest.raises(ConfigProblem, match="vLLM has no layered prefill"):
        build(vllm_run(small_model, "policy=paper"))


def test_without_vllm_the_backend_says_how_to_install_it(small_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # (import vllm now fails)
    with pytest.raises(ConfigError, match=r"needs vLLM.*make vllm"):
        check_backend(BackendConfig(name="vllm"), engine_config(small_model, "chunked"),
                      ModelConfig.load(str(small_model)))


@needs_vllm
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_run_serves_vllms_chunked_baseline_beside_the_policies(small_model, tmp_path):
    prefix = Path(sys.prefix)  # (this environment has vLLM: both of make run's)
    out = tmp_path / "main"
    model = (f"engine.model={small_model} engine.weights={small_model} "
             "engine.kv_cache_tokens=4096 engine.max_model_len=512 engine.max_num_seqs=8")
    run = subprocess.run(
        ["make", "-o", str(prefix / ".installed"), "run", f"VENV={prefix}",
         f"VLLM_VENV={prefix}", "RUN_VLLM=auto", f"RUN_DIR={out}", "RUN_RATES=10",
         f"LEARNED={tmp_path / 'none'}", f"RUN_EXTRA={model}", "RUN_GROUPS=1,2",
         "RUN_SPEED=1", "RUN_ARGS=workload=arxiv4k workload.scale=0.02 "
         "workload.num_requests=3 workload.max_output=4 progress=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "baseline skipped" not in run.stdout
    with (out / "goodput.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["policy"] for r in rows) == [
        "chunked", "chunked (vLLM)", "fixed groups=1", "fixed groups=2", "paper", "slo_aware"]
    # One scenario, one panel: vLLM's line beside the engine's, each saying its engine.
    assert len({(r["workload"], r["model"], r["latency"]) for r in rows}) == 1
    assert {r["policy"]: r["engine"] for r in rows}["chunked (vLLM)"] == "vllm"
    assert {r["engine"] for r in rows} == {"torch", "vllm"}
    summary = json.loads((out / "vllm-10.0-s0" / "summary.json").read_text())
    assert summary["engine"] == "vllm" and summary["requests_finished"] == 3


def test_the_checkpoint_vllm_loads_holds_the_engines_weights(tmp_path):
    from engine_adapter.vllm_engine import checkpoint
    from engine_adapter.weights import hf_views, load_safetensors

    config = EngineConfig(model="qwen3-moe-tiny", seed=3)
    model = ModelConfig.load("qwen3-moe-tiny")
    folder = checkpoint(config, model, cache=tmp_path)
    written = (folder / "model.safetensors").stat().st_mtime_ns
    assert checkpoint(config, model, cache=tmp_path) == folder  # written once, then reused
    assert (folder / "model.safetensors").stat().st_mtime_ns == written
    ours = hf_views(model, dummy_weights(model, torch.float32, torch.device("cpu"), seed=3))
    theirs = hf_views(model, load_safetensors(model, folder, torch.float32,
                                              torch.device("cpu")))
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # Another seed, or an edited model configuration, is another checkpoint.
    assert checkpoint(EngineConfig(model="qwen3-moe-tiny", seed=4), model, tmp_path) != folder
    edited = ModelConfig.from_hf_dict({**model.hf_config, "rms_norm_eps": 1e-5},
                                      "qwen3-moe-tiny")
    assert checkpoint(config, edited, cache=tmp_path) != folder
    assert not list(tmp_path.glob(".*"))  # (no half-written folder left)
    # Weights of the user's own are loaded where they lie; a folder without config.json is
    # a clear error.
    assert checkpoint(EngineConfig(model="qwen3-moe-tiny", weights=str(folder)), model) == folder
    with pytest.raises(ConfigError, match="no config.json"):
        checkpoint(EngineConfig(model="qwen3-moe-tiny", weights=str(tmp_path)), model)


@needs_vllm
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_run_skips_vllm_on_a_model_it_cannot_serve_unless_insisted(tmp_path):
    """qwen3-moe-tiny's heads (16) are too small for vLLM's CPU attention: found by
    RUN_VLLM=auto, vLLM's baseline is skipped and make run goes on; with RUN_VLLM=1 it
    stops."""
    prefix = Path(sys.prefix)

    def make_run(mode: str, out: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["make", "-o", str(prefix / ".installed"), "run", f"VENV={prefix}",
             f"VLLM_VENV={prefix}", f"RUN_VLLM={mode}", f"RUN_DIR={out}", "RUN_RATES=10",
             f"LEARNED={tmp_path / 'none'}", "RUN_EXTRA=model=qwen3-moe-tiny",
             "RUN_GROUPS=1", "RUN_SPEED=1", "RUN_ARGS=workload=arxiv4k workload.scale=0.02 "
             "workload.num_requests=2 workload.max_output=4 progress=false"],
            cwd=ROOT, capture_output=True, text=True, timeout=600)

    found = make_run("auto", tmp_path / "auto")
    assert found.returncode == 0, found.stdout[-3000:] + found.stderr[-3000:]
    assert "vLLM did not serve this (its error above): its chunked baseline skipped" in (
        found.stdout)
    assert (tmp_path / "auto" / "goodput.csv").is_file()  # the others ran, the report too
    insisted = make_run("1", tmp_path / "insisted")
    assert insisted.returncode != 0
    assert not (tmp_path / "insisted" / "goodput.csv").exists()



@needs_vllm
def test_vllms_benchmark_client_load_tests_lpenv_serve(tmp_path):
    """vLLM's own client (``vllm bench serve``) against lpenv-serve: every request completes,
    with the prompt and output lengths it asked for, and the server counts the same."""
    from scripts import bench_serve

    n, prompt, output = 10, 96, 6
    result = bench_serve.main(["--out", str(tmp_path / "b.json"), "--rate", "4",
                               "--num-prompts", str(n), "--input-len", str(prompt),
                               "--output-len", str(output), "model=qwen3-moe-tiny",
                               "warmup=false"])
    assert json.loads((tmp_path / "b.json").read_text()) == result
    client, server = result["client"], result["server"]
    assert (client["completed"], client["failed"]) == (n, 0)
    assert client["total_input_tokens"] == n * prompt  # (the client's tokenizer is the server's)
    assert client["total_output_tokens"] == n * output
    assert client["median_ttft_ms"] > 0 and client["median_tpot_ms"] > 0
    assert 0 <= client["slo_attainment"] <= 1
    assert server['lpenv_requests_total{outcome="finished"}'] == n
    assert server["lpenv_prompt_tokens_total"] == n * prompt
    assert server["lpenv_generation_tokens_total"] == n * output
    assert server["lpenv_kv_blocks_free"] == server["lpenv_kv_blocks"]


@needs_vllm
def test_bench_serve_runs_vllms_own_server_on_the_same_weights(tmp_path):
    """``--vllm``: vLLM's OpenAI server serves the same checkpoint as lpenv's chunked baseline,
    to the same client and prompts (the same token counts on both servers)."""
    from scripts import bench_serve

    n, prompt, output = 6, 64, 4
    result = bench_serve.main(["--out", str(tmp_path / "b.json"), "--rate", "4",
                               "--num-prompts", str(n), "--input-len", str(prompt),
                               "--output-len", str(output), "--vllm", "policy=chunked",
                               "warmup=false"])
    for side in ("client", "vllm"):
        c = result[side]
        assert (c["completed"], c["failed"]) == (n, 0), side
        assert (c["total_input_tokens"], c["total_output_tokens"]) == (n * prompt, n * output)
        assert 0 <= c["slo_attainment"] <= 1
    assert result["settings"]["mode"] == "chunked"
