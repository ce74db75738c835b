"""The simulator's hot path compiled with mypyc (engine_adapter/compiled.py): it runs
episodes exactly as its source does, and a build that no longer matches its source never
runs. (`make` builds it; without a build these tests check the source against itself and the
guard's logic.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine_adapter import compiled

ROOT = Path(__file__).resolve().parent.parent

# A sim episode under the paper rule (runs, decisions, rewards, energy): its summary as JSON.
EPISODE = """
import json, numpy as np
from engine_adapter.compiled import running_compiled
from engine_adapter.clock import VirtualClock
from engine_adapter.config import EngineConfig
from engine_adapter.engine import Engine
from engine_adapter.model_config import ModelConfig
from lpenv.backends import BackendConfig, build_executor
from lpenv.episode import Episode
from lpenv.reward import SLO, RewardConfig
from lpenv.workload import WorkloadConfig, generate
from policies.paper_rule import PaperRule

mcfg = ModelConfig.load("qwen3-30b-a3b")
cfg = EngineConfig(model=mcfg.name, prefill_budget=8192, kv_cache_tokens=60000,
                   max_num_seqs=256, max_model_len=32768, dtype="bfloat16")
executor = build_executor(BackendConfig(name="sim", hardware="h100-sxm-tp2"), cfg, mcfg)
engine = Engine(cfg, executor=executor, clock=VirtualClock(), model_config=mcfg)
rng = np.random.default_rng(3)
workload = WorkloadConfig(lengths="arxiv", rate=4.0, num_requests=40, max_prompt=16000,
                          max_output=150)
episode = Episode(engine, generate(workload, rng), SLO(2.0, 0.1), RewardConfig(), rng)
summary = episode.run(PaperRule())
print(json.dumps({"compiled": running_compiled(), "summary": summary}, sort_keys=True,
                 default=str))
"""


def _episode(pure: bool) -> dict:
    env = {**os.environ, compiled.PURE_ENV: "1" if pure else "0"}
    out = subprocess.run([sys.executable, "-c", EPISODE], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_compiled_and_source_run_an_episode_to_the_bit():
    built, source = _episode(pure=False), _episode(pure=True)
    assert not source["compiled"]
    assert built["compiled"] == (compiled.stale_reason() is None)
    assert built["summary"] == source["summary"]  # every figure, as JSON writes floats
    assert source["summary"]["requests_finished"] == 40


def test_the_build_runs_where_make_built_it():
    # .ci/run sets LPENV_EXPECT_COMPILED=1: a build that failed or went stale is an error
    # there, not a silent slowdown.
    if os.environ.get("LPENV_EXPECT_COMPILED") != "1":
        pytest.skip("LPENV_EXPECT_COMPILED is not set (make builds the modules; .ci/run checks)")
    assert compiled.stale_reason() is None
    assert compiled.running_compiled()
    import engine_adapter.scheduler as scheduler

    assert Path(scheduler.__file__).suffix != ".py"


def test_a_build_whose_sources_changed_is_stale(tmp_path, monkeypatch):
    manifest = tmp_path / "compiled.json"
    monkeypatch.setattr(compiled, "MANIFEST", manifest)
    built = all(compiled.extension(m) is not None for m in compiled.MODULES)
    if not built:
        assert compiled.stale_reason().startswith("not built")
        return
    assert "missing" in compiled.stale_reason()
    made = compiled.record()
    manifest.write_text(json.dumps({**made, "digest": "0" * 64}))
    assert compiled.stale_reason() == "sources changed since the build"
    manifest.write_text(json.dumps(made))
    assert compiled.stale_reason() is None


def test_the_digest_covers_the_modules_the_compiled_ones_are_compiled_against():
    against = compiled.compiled_against()
    assert set(compiled.MODULES) <= set(against)
    # (types the build compiled in from modules it does not compile: config.EngineConfig,
    # model_config.ModelConfig, workload.RequestSpec)
    assert {"engine_adapter.config", "engine_adapter.model_config", "lpenv.workload"} <= set(
        against)
    assert "engine_adapter.compiled" not in against  # (the guard is not compiled in)
    assert compiled.record()["digest"] == compiled.digest(against)


def test_the_source_finder_takes_the_compiled_modules_from_their_source():
    finder = compiled._FromSource("stale")
    with pytest.warns(UserWarning, match="stale"):  # once, at the first
        finder.find_spec(compiled.MODULES[0])
    for name in compiled.MODULES:
        spec = finder.find_spec(name)
        assert spec is not None and spec.origin == str(compiled.source(name))
        assert Path(spec.origin).exists()
    assert finder.find_spec("engine_adapter.serving") is None  # (never compiled)
    assert finder.find_spec("json") is None


def test_pure_python_is_asked_for_by_the_environment():
    code = ("import engine_adapter.scheduler as s, engine_adapter.compiled as c; "
            "print(s.__file__, c.running_compiled())")
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=ROOT,
                         env={**os.environ, compiled.PURE_ENV: "1"}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr  # (no warning: it was asked for)
    path, running = out.stdout.split()
    assert path.endswith("scheduler.py") and running == "False"


def test_a_build_that_does_not_load_runs_the_source(tmp_path, monkeypatch):
    """Files and digest in order, but the shared library fails to load (another machine's
    libc, a damaged file): the build is stale (``lpenv-compile --if-stale`` rebuilds it) and
    the source runs, with a warning saying why, instead of every import failing."""
    manifest = tmp_path / "compiled.json"
    manifest.write_text(json.dumps(compiled.record()))  # (this tree's digest)
    monkeypatch.setattr(compiled, "MANIFEST", manifest)
    monkeypatch.setattr(compiled, "extension", lambda name: Path(__file__))  # (all there)
    monkeypatch.setattr(compiled, "GROUP", "engine_adapter.no_such_build")
    monkeypatch.setattr(compiled, "_state", {})
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    monkeypatch.delenv(compiled.PURE_ENV, raising=False)
    reason = compiled.stale_reason()
    assert reason.startswith("its shared library does not load") and "no_such_build" in reason
    compiled.guard()
    assert compiled._state["compiled"] is False
    finder = sys.meta_path[0]
    assert isinstance(finder, compiled._FromSource) and reason in finder.warning
