"""conf/ and its schema: every group option composes and builds; the sections map 1:1 onto the
dataclasses the env and the engine take; unknown or ill-typed keys fail with messages that name
the key; the cluster launcher's config composes (nothing is launched)."""

from __future__ import annotations

import dataclasses
import inspect
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

import lpenv
from engine_adapter.hardware import DATASHEET_PROFILES, write_profile
from lpenv.config_schema import (
    POLICY_SCHEMAS,
    SECTIONS,
    EnvOptions,
    env_kwargs,
    policy_params,
    to_dataclass,
)
from lpenv.env import LayeredPrefillEnv
from policies.chunked import ChunkedPrefill
from policies.fixed import FixedGroups
from policies.paper_rule import PaperRule
from policies.random_policy import RandomPolicy
from policies.slo_aware import SloAware
from scripts.evaluate import CONFIG_DIR, ConfigProblem, build

ROOT = Path(__file__).resolve().parent.parent
GROUPS = ("engine", "model", "hardware", "workload", "slo", "reward", "policy")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def load(overrides=(), name="evaluate", hydra=False, config_dir=CONFIG_DIR):
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(name, overrides=list(overrides), return_hydra_config=hydra)


def error_text(exc: BaseException) -> str:
    """The message a user sees: the exception and its causes."""
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__
    return "\n".join(parts)


@pytest.fixture(scope="module")
def trace_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "trace.csv"
    path.write_text("num_prefill_tokens,num_decode_tokens\n800,40\n1600,80\n400,20\n")
    return path


# ---- every option of every group -----------------------------------------------------------
def test_groups_exist():
    for group in GROUPS + ("train",):
        assert options(group), group
    assert options("model") == ["gpt-oss-20b", "mixtral-tiny", "qwen3-30b-a3b", "qwen3-moe-cpu",
                                "qwen3-moe-tiny"]
    assert options("workload") == ["arxiv", "arxiv4k", "sharegpt", "trace"]
    assert set(options("policy")) == set(POLICY_SCHEMAS)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_builds(group, option, trace_csv, tmp_path, monkeypatch):
    # cpu-auto names this machine's calibrated profile: stand one in.
    monkeypatch.setenv("LPENV_PROFILE_DIR", str(tmp_path))
    write_profile(replace(DATASHEET_PROFILES["cpu-generic"], name="cpu-auto"))
    overrides = [f"{group}={option}"]
    if option == "trace":
        overrides.append(f"workload.trace={trace_csv}")
    cfg = load(overrides)
    for name in SECTIONS:  # each section builds its dataclass, checks included
        to_dataclass(name, cfg[name])
    if group == "model":
        assert cfg.engine.model == option
        if option in ("gpt-oss-20b", "qwen3-30b-a3b"):  # paper scale: the simulator's
            cfg = load(overrides + ["backend.name=sim"])
    if group == "hardware":
        profiles = {"cpu": "cpu-generic", "cpu-auto": "cpu-auto", "h100": "h100-sxm",
                    "h200": "h200", "a100": "a100-80g"}
        assert to_dataclass("backend", cfg.backend).hardware == profiles[option]
        assert cfg.engine.device == ("cpu" if option.startswith("cpu") else "cuda")
        if cfg.engine.device == "cuda" and not torch.cuda.is_available():
            with pytest.raises(ConfigProblem, match="no CUDA device"):  # the real engine
                build(cfg)
            cfg = load(overrides + ["backend.name=sim"])  # simulating the GPU needs none
    if group == "policy":
        assert cfg.policy.name == option
        if option == "learned":  # needs an exported policy: built in test_evaluate
            assert policy_params(cfg.policy) == {"path": "results/learned/policy"}
            return
    setup = build(cfg)  # the engine config, the model's shape and the policy
    assert setup.engine.mode == setup.policy.mode


def test_defaults_are_the_cpu_setup():
    cfg = load()
    assert (cfg.engine.model, cfg.engine.device, cfg.backend.hardware) == (
        "qwen3-moe-cpu", "cpu", "cpu-generic")
    assert cfg.policy.name == "paper" and cfg.workload.name == "arxiv4k"
    assert (cfg.slo.ttft_s, cfg.slo.tbt_s) == (2.0, 0.125)


def test_slo_presets_are_the_papers():
    assert (load(["slo=arxiv"]).slo.ttft_s, load(["slo=sharegpt"]).slo.ttft_s) == (10.0, 5.0)
    assert load(["slo=arxiv"]).slo.tbt_s == 0.125


def test_chunked_policy_brings_its_token_budget():
    setup = build(load(["policy=chunked", "policy.chunk_tokens=32"]))
    assert (setup.engine.mode, setup.engine.chunk_tokens) == ("chunked", 32)
    # By default the chunk and the paper rule's unit follow the engine's chunk size.
    assert load(["policy=chunked", "engine=paper"]).policy.chunk_tokens == 512
    assert load(["engine.chunk_tokens=128"]).policy.unit == 128


def test_workload_lengths_tables_scale_for_the_cpu():
    for option, lengths in (("arxiv", "arxiv"), ("arxiv4k", "arxiv4k"), ("sharegpt", "sharegpt")):
        w = to_dataclass("workload", load([f"workload={option}"]).workload)
        assert w.lengths == lengths and w.scale < 1 and w.trace is None


def test_trace_workload_needs_a_path():
    with pytest.raises(ConfigProblem, match="workload.trace"):
        build(load(["workload=trace"]))


@pytest.mark.parametrize("body,error", [
    ("", "needs columns num_prefill_tokens and num_decode_tokens"),
    ("prompt,output\n10,2\n", "needs columns"),
    ("num_prefill_tokens,num_decode_tokens\n", "has no requests"),
    ("num_prefill_tokens,num_decode_tokens\n100,4\nabc,3\n", r"line 3: \['abc', '3'\] are not"),
    ("num_prefill_tokens,num_decode_tokens\n-5,3\n", "line 2: .*non-negative"),
    ("num_prefill_tokens,num_decode_tokens\nnan,3\n", "line 2: .*finite"),
    ("num_prefill_tokens,num_decode_tokens,arrival_time_s\n100,3,-1\n", "line 2"),
])
def test_a_bad_trace_is_refused_with_the_config_naming_its_line(tmp_path, body, error):
    """Not clipped into a length, not a traceback mid-run: lpenv-eval's configuration
    problem, and the env's error when it is made."""
    path = tmp_path / "bad.csv"
    path.write_text(body)
    with pytest.raises(ConfigProblem, match=error):
        build(load(["workload=trace", f"workload.trace={path}"]))


def test_a_trace_is_read_once_per_version(trace_csv, tmp_path):
    """Episodes reset often: the trace is parsed once, and again when the file changes."""
    from lpenv.workload import WorkloadConfig, _trace_arrays, generate

    _trace_arrays.cache_clear()
    config = WorkloadConfig(trace=str(trace_csv), num_requests=4)
    for seed in range(3):
        specs = generate(config, np.random.default_rng(seed))
        assert {s.prompt_tokens for s in specs} <= {800, 1600, 400}
    assert _trace_arrays.cache_info().misses == 1
    changed = tmp_path / "changed.csv"
    changed.write_text("num_prefill_tokens,num_decode_tokens\n77,5\n")
    assert {s.prompt_tokens for s in generate(WorkloadConfig(trace=str(changed)),
                                              np.random.default_rng(0))} == {77}


# ---- the sections are the dataclasses ------------------------------------------------------
@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_sections_map_one_to_one_onto_the_dataclasses(section):
    schema = SECTIONS[section]
    target = schema.target
    want = [(f.name, f.default) for f in dataclasses.fields(target) if f.init]
    have = [(f.name, f.default) for f in dataclasses.fields(schema)]
    if section == "slo":  # required fields: no defaults
        want = [(n, "???") for n, _ in want]
        have = [(n, "???") for n, _ in have]
    assert have == want


@pytest.mark.parametrize("name,cls", [("fixed", FixedGroups), ("paper", PaperRule),
                                      ("slo_aware", SloAware), ("chunked", ChunkedPrefill),
                                      ("random", RandomPolicy)])
def test_policy_schemas_are_the_policies_parameters(name, cls):
    params = {f.name for f in dataclasses.fields(cls) if f.init} - {"name", "mode", "context"}
    schema = {f.name for f in dataclasses.fields(POLICY_SCHEMAS[name])} - {"name", "label"}
    assert schema == params


def test_env_options_are_the_envs_arguments():
    env_args = set(inspect.signature(LayeredPrefillEnv.__init__).parameters)
    assert {f.name for f in dataclasses.fields(EnvOptions)} <= env_args


@pytest.mark.parametrize("option", options("train"))
def test_train_config_makes_the_env(option):
    cfg = load([f"train={option}", "model=qwen3-moe-tiny"], name="train")
    assert cfg.train.algo == option
    env = gym.make(lpenv.ENV_ID, **env_kwargs(cfg))  # builds specs; the model waits for reset
    assert env.unwrapped.engine_config.model == "qwen3-moe-tiny"
    assert env.unwrapped.slo.tbt_s == cfg.slo.tbt_s
    env.close()


@pytest.mark.parametrize("override,message", [
    ("env.admission_levels=0", "admission_levels must be a positive integer"),
    ("env.group_choices=[1,9]", "exceed the model's"),
    ("env.horizon_s=-1", "horizon_s must be positive"),
    ("+train.hyperparams.policy_kwargs.activation_fn=relux", "activation_fn 'relux'"),
])
def test_train_config_mistakes_are_caught_before_training(override, message):
    from scripts.train import check

    cfg = load(["model=qwen3-moe-tiny", override], name="train")
    with pytest.raises(ValueError, match=message):  # (they were tracebacks mid-run)
        check(cfg)
    check(load(["model=qwen3-moe-tiny",
                "+train.hyperparams.policy_kwargs.activation_fn=relu"], name="train"))


def test_train_never_replaces_a_folder_that_is_not_an_export(tmp_path):
    from scripts.train import check

    (tmp_path / "keep.json").write_text("{}")  # e.g. export_path=results
    with pytest.raises(ValueError, match="not a policy artifact"):
        check(load(["model=qwen3-moe-tiny", f"train.export_path={tmp_path}"], name="train"))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "policy.json").write_text("{}")  # an earlier export: replaced
    check(load(["model=qwen3-moe-tiny", f"train.export_path={tmp_path / 'old'}"], name="train"))


def test_an_activation_by_name_reaches_sb3_as_its_class():
    import torch.nn as nn

    from policies.sb3 import with_activation_class

    params = {"policy_kwargs": {"net_arch": [8], "activation_fn": "relu"}, "n_steps": 64}
    assert with_activation_class(params)["policy_kwargs"] == {"net_arch": [8],
                                                              "activation_fn": nn.ReLU}
    assert params["policy_kwargs"]["activation_fn"] == "relu"  # the record keeps the name


# ---- mistakes: rejected, and the message names the key -------------------------------------
def test_an_added_top_level_key_nothing_reads_is_refused():
    # (`+horizon=1` for horizon_s ran without a horizon, silently)
    with pytest.raises(ConfigProblem, match="unknown key.*horizon: nothing reads them"):
        build(load(["+horizon=1"]))
    from scripts.train import check

    with pytest.raises(ValueError, match="unknown key.*foo"):
        check(load(["model=qwen3-moe-tiny", "+foo=1"], name="train"))


@pytest.mark.parametrize("overrides,expected", [
    (["engine.prefill_budgt=1024"],
     ["Key 'prefill_budgt' not in 'EngineSchema'", "full_key: engine.prefill_budgt"]),
    (["policy=fixed", "policy.grups=2"],
     ["Key 'grups' not in 'FixedPolicySchema'", "full_key: policy.grups"]),
    (["policy.groups=2"],  # the default policy (paper) has no G to fix
     ["Key 'groups' not in 'PaperPolicySchema'"]),
    (["workload.rate=fast"],
     ["Value 'fast' of type 'str' could not be converted to Float", "full_key: workload.rate"]),
    (["engine.prefill_budget=1.5"],
     ["could not be converted to Integer", "full_key: engine.prefill_budget"]),
    (["policy=fixed", "policy.staggered=maybe"],
     ["Value 'maybe' is not a valid bool", "full_key: policy.staggered"]),
    (["slo.ttft=2"], ["Key 'ttft' not in 'SLOSchema'"]),
])
def test_unknown_or_ill_typed_keys_are_rejected(overrides, expected):
    with pytest.raises(ConfigCompositionException) as info:
        load(overrides)
    text = error_text(info.value)
    for fragment in expected:
        assert fragment in text, text


def test_unknown_key_in_a_group_file_is_rejected(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONFIG_DIR, conf)
    (conf / "engine" / "typo.yaml").write_text("prefill_budget: 1024\nchunk_token: 64\n")
    with pytest.raises(ConfigCompositionException) as info:
        load(["engine=typo"], config_dir=conf)
    text = error_text(info.value)
    assert "Key 'chunk_token' not in 'EngineSchema'" in text and "engine/typo" in text


@pytest.mark.parametrize("overrides,match", [
    (["+engine.foo=1"], r"unknown key\(s\) engine.foo; engine takes: block_size"),
    (["workload.rate=-1"], "rate, cv and scale must be positive"),
    (["engine.mode=pipelined"], "mode must be one of"),
    (["backend.latency=guessed"], "latency must be one of"),
    (["backend.latency_scale=0"], "latency_scale must be a positive number, got 0"),
    (["workload.rate_max=9"], "an evaluation runs one rate: sweep workload.rate"),
    (["backend.name=sim", "backend.latency_scale=0.5"], "scales measured latencies"),
    (["backend.latency=modeled", "backend.latency_scale=0.5"], "scales measured latencies"),
    (["engine.model=no-such-model"], "no-such-model"),
])
def test_values_the_dataclasses_refuse(overrides, match):
    with pytest.raises(ConfigProblem, match=match):
        build(load(overrides))


def test_unknown_group_option_lists_the_options():
    with pytest.raises(ConfigCompositionException) as info:
        load(["model=no-such-model"])
    assert "qwen3-moe-tiny" in error_text(info.value)


def test_command_line_error_is_one_clear_message(tmp_path):
    base = [sys.executable, "-m", "scripts.evaluate", f"hydra.run.dir={tmp_path}"]
    typo = subprocess.run(base + ["engine.prefill_budgt=3"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert typo.returncode != 0
    assert "Key 'prefill_budgt' not in 'EngineSchema'" in typo.stderr
    assert "full_key: engine.prefill_budgt" in typo.stderr
    bad = subprocess.run(base + ["workload.rate=-2"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0
    assert ("lpenv-eval: invalid configuration (workload.rate=-2): workload rate, cv and scale "
            "must be positive") in bad.stderr
    assert "Traceback" not in bad.stderr


# ---- launchers -----------------------------------------------------------------------------
def test_joblib_is_the_default_launcher():
    cfg = load(hydra=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert load(["hydra.launcher.n_jobs=3"], hydra=True).hydra.launcher.n_jobs == 3


@pytest.mark.parametrize("launcher", ["slurm", "submitit_slurm"])
def test_cluster_launcher_config_composes(launcher):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = load([f"hydra/launcher={launcher}", "hydra.launcher.partition=cpu",
                "hydra.launcher.timeout_min=30", "policy=fixed", "policy.groups=4"], hydra=True)
    launcher_cfg = cfg.hydra.launcher
    assert launcher_cfg._target_ == (
        "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher")
    assert (launcher_cfg.partition, launcher_cfg.timeout_min) == ("cpu", 30)
    if launcher == "slurm":  # the preset's own settings
        assert (launcher_cfg.cpus_per_task, launcher_cfg.mem_gb) == (2, 8)
    # The launcher object builds from the config; nothing is submitted until launch().
    assert type(instantiate(launcher_cfg)).__name__ == "SlurmLauncher"
