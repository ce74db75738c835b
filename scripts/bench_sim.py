"""Benchmark the simulator backend's speed (issue: calibrated simulator, item 5).

Writes JSON with ``realtime_factor`` (simulated seconds per wall second) for the paper's
arXiv Qwen3-30B-A3B run (Poisson 1.5 req/s, 600 s after a 60 s warm-up: requests arriving in
the first 660 s) under the paper's rule on the ``h100-sxm-tp2`` profile (the paper's
2 x H100, tensor parallel 2, BF16), ``env_steps_per_s`` for the env on the sim backend
with a trivial policy (``random_policy``: the same under uniformly random valid actions), and
``wall_s``. One process, one core. Figures are medians over
``--repeats`` runs (this machine is shared), each run's figure listed beside them.

The same run one iteration at a time (``Episode(fast_forward=False)``: no runs) is timed
once too: ``one_by_one`` gives its realtime factor and whether its result is identical
(simulated time, iterations, attainment, energy), so the speed-up is measured side by side
and costs nothing in accuracy. ``chunked_512`` gives the same figures for the paper's
baseline (chunked prefill, 512-token budget) on the same workload.

``compiled`` says whether the simulator's hot path ran compiled (``engine_adapter.compiled``);
if it did, ``source`` gives ``env_steps_per_s`` measured right after from the same modules'
source (``LPENV_PURE_PYTHON=1``, a process of its own): the build's worth, side by side.

    python -m scripts.bench_sim --out results/bench_sim.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm

import lpenv
from engine_adapter.clock import VirtualClock
from engine_adapter.compiled import PURE_ENV, running_compiled
from engine_adapter.config import EngineConfig
from engine_adapter.engine import Engine
from engine_adapter.model_config import ModelConfig
from lpenv.backends import BackendConfig, build_executor
from lpenv.episode import Episode
from lpenv.reward import SLO, RewardConfig
from lpenv.workload import WorkloadConfig, generate
from policies.chunked import ChunkedPrefill
from policies.paper_rule import PaperRule

# (conf/engine/paper.yaml's KV cache: 262,144 tokens, 25.8 GB beside 61.1 GB of weights on
# 2 x 80 GB)
PAPER_ENGINE = dict(model="qwen3-30b-a3b", prefill_budget=8192, chunk_tokens=512,
                    kv_cache_tokens=262144, max_num_seqs=256, max_model_len=32768,
                    dtype="bfloat16")
# The paper's rule keeps one batch in flight (as lpenv-eval runs it: policy.max_in_flight).
PAPER_RULE_ENGINE = {**PAPER_ENGINE, "max_batches_in_flight": PaperRule().max_in_flight}
# The paper's baseline: chunked prefill with a 512-token budget.
CHUNKED_ENGINE = {**PAPER_ENGINE, "mode": "chunked", "chunk_tokens": 512}


def realtime_factor(seconds: float, rate: float, seed: int, warmup: float = 60.0,
                    fast_forward: bool = True, chunked: bool = False) -> dict:
    mcfg = ModelConfig.load("qwen3-30b-a3b")
    policy = ChunkedPrefill(512) if chunked else PaperRule(max_groups=16)
    cfg = EngineConfig(**(CHUNKED_ENGINE if chunked else PAPER_RULE_ENGINE))
    backend = BackendConfig(name="sim", hardware="h100-sxm-tp2")
    engine = Engine(cfg, executor=build_executor(backend, cfg, mcfg), clock=VirtualClock(),
                    model_config=mcfg)
    rng = np.random.default_rng(seed)
    # The paper's run, as lpenv-paper runs it: 600 s after a 60 s warm-up, prompts clipped
    # to fit the model length.
    workload = WorkloadConfig(lengths="arxiv", rate=rate, duration_s=seconds, warmup_s=warmup,
                              max_prompt=32256, max_output=1024)
    requests = generate(workload, rng)
    n = len(requests)
    episode = Episode(engine, requests, SLO(10.0, 0.125), RewardConfig(), rng,
                      measure_from_s=workload.warmup_s, fast_forward=fast_forward)
    start = time.perf_counter()
    summary = episode.run(policy)
    wall = time.perf_counter() - start
    return {"simulated_s": summary["sim_time_s"], "wall_s": wall,
            "realtime_factor": summary["sim_time_s"] / wall, "requests": n,
            "iterations": summary["iterations"], "slo_attainment": summary["slo_attainment"],
            "energy_j": summary["energy_j"], "return": summary["return"]}


def repeated(measure, repeats: int, key: str) -> dict:
    """``measure()`` ``repeats`` times: the first run's result with ``key`` and the wall
    times replaced by their medians, and every run's ``key`` listed."""
    runs = [measure() for _ in tqdm(range(repeats), desc=key, leave=False)]
    out = dict(runs[0])
    for k in (key, "wall_s", "env_wall_s"):
        if k in out:
            out[k] = float(np.median([r[k] for r in runs]))
    out[f"{key}_runs"] = [r[key] for r in runs]
    return out


def env_steps(steps: int, seed: int, random: bool = False) -> dict:
    """The env on the sim backend: the trivial policy (G = 1, the whole budget, start when
    allowed), or (``random``) uniformly random valid actions, which use every G, admission
    level and waiting (the choosing is not timed: it is not the env's work)."""
    env = gym.make(lpenv.ENV_ID, engine=PAPER_ENGINE,
                   workload={"lengths": "arxiv", "rate": 1.5, "num_requests": 200,
                             "max_prompt": 32768},
                   slo={"ttft_s": 10.0, "tbt_s": 0.125},
                   backend={"name": "sim", "hardware": "h100-sxm-tp2"})
    env.reset(seed=seed)
    codec = env.unwrapped.codec
    levels, rng = codec.admission_levels, np.random.default_rng(seed)
    offsets = np.cumsum([0, *codec.nvec[:-1]])
    done_steps, wall = 0, 0.0
    while done_steps < steps:
        start = time.perf_counter()
        mask = env.unwrapped.action_masks()  # (the env's work: MaskablePPO asks every step)
        if random:
            wall += time.perf_counter() - start
            action = [int(rng.choice(np.flatnonzero(mask[o:o + n])))
                      for o, n in zip(offsets, codec.nvec)]
            start = time.perf_counter()
        else:
            action = [0, levels - 1, int(mask[-1])]
        _, _, term, trunc, _ = env.step(action)
        done_steps += 1
        if term or trunc:
            env.reset()
        wall += time.perf_counter() - start
    key = "env_random_steps_per_s" if random else "env_steps_per_s"
    return {"env_steps": done_steps, "env_wall_s": wall, key: done_steps / wall}


def env_steps_from_source(steps: int, seed: int, repeats: int) -> dict:
    """``env_steps`` in a process that runs the compiled modules' source
    (``LPENV_PURE_PYTHON=1``): what the build is worth."""
    code = ("import json, sys; from scripts.bench_sim import env_steps, repeated; "
            "print(json.dumps(repeated(lambda: env_steps(*map(int, sys.argv[1:3])), "
            "int(sys.argv[3]), 'env_steps_per_s')))")
    out = subprocess.run([sys.executable, "-c", code, str(steps), str(seed), str(repeats)],
                         env={**os.environ, PURE_ENV: "1"}, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    if out.returncode:
        raise RuntimeError(f"the env from source failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seconds", type=float, default=600.0, help="measured window (s)")
    p.add_argument("--warmup", type=float, default=60.0, help="warm-up before it (s)")
    p.add_argument("--rate", type=float, default=1.5)
    p.add_argument("--env-steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5, help="runs per figure (median)")
    args = p.parse_args(argv)
    for key in ("seconds", "rate", "env_steps", "repeats"):
        if not getattr(args, key) > 0:
            p.error(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    torch.set_num_threads(1)
    start = time.perf_counter()

    def run(fast_forward: bool = True, chunked: bool = False) -> dict:
        return realtime_factor(args.seconds, args.rate, args.seed, args.warmup, fast_forward,
                               chunked)

    result = {"model": "qwen3-30b-a3b", "hardware": "h100-sxm-tp2", "workload": "arxiv",
              "rate": args.rate, "policy": "paper", "compiled": running_compiled(),
              **repeated(run, args.repeats, "realtime_factor"),
              **repeated(lambda: env_steps(args.env_steps, args.seed), args.repeats,
                         "env_steps_per_s")}
    # Uniformly random valid actions: every G, admission level and waiting (not a target).
    result["random_policy"] = repeated(lambda: env_steps(args.env_steps, args.seed, True),
                                       args.repeats, "env_random_steps_per_s")
    same = ("simulated_s", "iterations", "slo_attainment", "energy_j", "return")

    def one_by_one(fast: dict, chunked: bool = False) -> dict:
        slow = run(fast_forward=False, chunked=chunked)
        return {"realtime_factor": slow["realtime_factor"], "wall_s": slow["wall_s"],
                "identical": all(slow[k] == fast[k] for k in same)}

    result["one_by_one"] = one_by_one(result)
    # The paper's baseline on the same workload (not a target: what a chunked sweep costs).
    chunked = repeated(lambda: run(chunked=True), args.repeats, "realtime_factor")
    chunked["one_by_one"] = one_by_one(chunked, chunked=True)
    result["chunked_512"] = chunked
    if result["compiled"]:  # the same env steps from the source, for the ratio
        result["source"] = env_steps_from_source(args.env_steps, args.seed, args.repeats)
    result["total_wall_s"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for key, value in result.items():
        print(f"{key:18s} {value}")


if __name__ == "__main__":
    main()
