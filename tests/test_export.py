"""Exported policies: SB3 actors and hand-written policies round-trip through an artifact
folder (JSON + safetensors), load without pickle or the training stack, act exactly as the
model did, and refuse a serving side they do not fit."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
import warnings
from dataclasses import asdict, fields, replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from sb3_contrib import MaskablePPO
from stable_baselines3.common.vec_env import DummyVecEnv

import lpenv
from engine_adapter.model_config import ModelConfig
from lpenv.observation import SPEC_VERSION
from policies import artifact_fit, env_configuration, export
from policies.chunked import ChunkedPrefill
from policies.export import export_handwritten, export_sb3, load_policy, main
from policies.fixed import FixedGroups
from policies.learned import LearnedPolicy, serving_mask
from policies.paper_rule import PaperRule
from policies.protocol import PolicyContext
from policies.random_policy import RandomPolicy
from policies.sb3 import make_env
from policies.slo_aware import SloAware
from tests.test_training import WORKLOAD

KWARGS = {**WORKLOAD, "workload": {**WORKLOAD["workload"], "num_requests": 12}}
SEEDS = [7, 8, 9]
SAMPLE_SEEDS = list(range(7, 14))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A briefly trained MaskablePPO, its artifact, and (obs, mask) pairs from real episodes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    venv = DummyVecEnv([make_env(KWARGS)])
    model = MaskablePPO("MlpPolicy", venv, n_steps=128, batch_size=64, seed=0, device="cpu",
                        policy_kwargs={"net_arch": [32, 32]})
    model.learn(256)
    path = export_sb3(model, venv, tmp_path_factory.mktemp("artifact") / "policy")
    env = make_env(KWARGS, monitor=False)()
    samples, rng = [], np.random.default_rng(0)
    for seed in SAMPLE_SEEDS:  # half stochastic actions: varied states
        obs, _ = env.reset(seed=seed)
        done = False
        while not done:
            mask = env.get_wrapper_attr("action_masks")()
            samples.append((obs, mask))
            action, _ = model.predict(obs, action_masks=mask, deterministic=rng.random() < 0.5)
            obs, _, terminated, truncated, _ = env.step(action)
            done = terminated or truncated
    yield model, venv, path, samples
    torch.set_num_threads(before)


def test_loaded_policy_acts_as_the_model(trained):
    model, _, path, samples = trained
    policy = load_policy(path)
    assert isinstance(policy, LearnedPolicy)
    assert len(samples) >= 150
    expected = np.array([model.predict(o, action_masks=m, deterministic=True)[0]
                         for o, m in samples])
    got = np.array([policy.act(o, m) for o, m in samples])
    assert np.array_equal(got, expected)
    # Batched, and the raw logits too.
    obs = np.stack([o for o, _ in samples])
    masks = np.stack([m for _, m in samples])
    assert np.array_equal(policy.act(obs, masks), expected)
    with torch.no_grad():
        sb3 = model.policy.action_net(model.policy.mlp_extractor.forward_actor(
            torch.as_tensor(obs)))
    np.testing.assert_allclose(policy.logits(obs), sb3.numpy(), rtol=1e-6, atol=1e-6)
    # Not every state gives the same action: the comparison means something.
    assert len({tuple(a) for a in expected}) > 1


def test_decide_in_place_equals_the_env_path(trained):
    """Episode.run with decide(view) (evaluation, server) plays as the model in the env."""
    model, _, path, _ = trained
    policy = load_policy(path)
    env = make_env(KWARGS, monitor=False)()
    for seed in SEEDS:
        obs, _ = env.reset(seed=seed)
        done, ret = False, 0.0
        while not done:
            mask = env.get_wrapper_attr("action_masks")()
            action, _ = model.predict(obs, action_masks=mask, deterministic=True)
            obs, reward, terminated, truncated, _ = env.step(action)
            ret, done = ret + reward, terminated or truncated
        base = gym.make(lpenv.ENV_ID, **KWARGS).unwrapped
        base.reset(seed=seed)
        summary = base.episode.run(policy)
        assert summary["return"] == pytest.approx(ret, abs=1e-9)


def test_serving_mask_is_what_decide_applies(trained):
    _, _, path, _ = trained
    policy = load_policy(path)
    env = gym.make(lpenv.ENV_ID, **KWARGS).unwrapped
    env.reset(seed=SEEDS[0])
    view = env.view
    assert not view.decode_context_lens and not view.in_flight
    decision = policy.decide(view)  # an idle engine: never waits
    assert decision.admit
    assert not serving_mask(policy.codec, view)[-2]


def test_loading_never_unpickles(trained, tmp_path, monkeypatch):
    _, venv, path, samples = trained
    hand = export_handwritten(PaperRule(max_groups=5), KWARGS, tmp_path / "paper")

    def refuse(*args, **kwargs):
        raise AssertionError("load_policy unpickled something")

    for target, name in ((pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"),
                         (torch, "load")):
        monkeypatch.setattr(target, name, refuse)
    policy = load_policy(path)
    obs, mask = samples[0]
    assert policy.act(obs, mask).shape == (3,)
    assert isinstance(load_policy(hand), PaperRule)


def test_serving_path_does_not_import_the_training_stack(trained):
    _, _, path, _ = trained
    code = ("import sys; from policies.export import load_policy; "
            f"p = load_policy({str(path)!r}); "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('stable_baselines3', 'sb3_contrib')]; "
            "assert not bad, bad; print(type(p).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "LearnedPolicy"


def test_artifact_has_the_required_fields(trained):
    model, venv, path, _ = trained
    doc = json.loads((path / "policy.json").read_text())
    assert doc["format"] == "lpenv-policy" and doc["format_version"] == 1
    assert doc["kind"] == "learned"
    config = venv.env_method("config_dict", indices=0)[0]
    assert doc["observation"] == config["observation"]
    assert doc["observation"]["version"] == SPEC_VERSION
    assert doc["actions"] == config["actions"] == {"group_choices": [1, 2, 3, 5],
                                                   "admission_levels": 4,
                                                   "allow_stagger": True}
    for key in ("engine", "workload", "slo", "reward", "backend", "horizon_s"):
        assert key in doc["env_config"]
    assert doc["env_config"]["slo"] == KWARGS["slo"]
    net = doc["network"]
    assert net == {"kind": "mlp", "input_dim": 29, "hidden": [32, 32], "activation": "tanh",
                   "output_dims": [4, 4, 2]}
    tensors = load_file(str(path / doc["weights"]))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "policy_net.0.weight": (32, 29), "policy_net.0.bias": (32,),
        "policy_net.2.weight": (32, 32), "policy_net.2.bias": (32,),
        "action_net.weight": (10, 32), "action_net.bias": (10,)}
    assert doc["training"]["algorithm"] == "MaskablePPO"
    # The recorded config rebuilds the same env.
    rebuilt = gym.make(lpenv.ENV_ID, **env_configuration.env_kwargs(doc["env_config"])).unwrapped
    assert rebuilt.config_dict() == config


def test_spec_mismatch_is_a_clear_error(trained, tmp_path):
    _, venv, path, _ = trained
    config = venv.env_method("config_dict", indices=0)[0]
    load_policy(path, expect=config)  # the env it was trained on: fits
    load_policy(path, expect={"num_layers": 5, "spec_version": SPEC_VERSION})
    with pytest.raises(ValueError, match=r"observation\.ttft_slo_s: artifact 0\.02, expected 1"):
        load_policy(path, expect={"observation": {**config["observation"], "ttft_slo_s": 1.0}})
    with pytest.raises(ValueError, match=r"observation\.num_layers: artifact 5, expected 48"):
        load_policy(path, expect={"num_layers": 48})
    with pytest.raises(ValueError, match=r"actions\.group_choices"):
        load_policy(path, expect={"actions": {"group_choices": [1, 2, 4, 8]}})
    with pytest.raises(ValueError, match=r"observation\.version: artifact 1, expected 2"):
        load_policy(path, expect={"spec_version": 2})
    with pytest.raises(ValueError, match="unknown expect key 'layers'"):
        load_policy(path, expect={"layers": 5})
    # An artifact from another observation spec version cannot be encoded by this code.
    old = tmp_path / "old"
    old.mkdir()
    doc = json.loads((path / "policy.json").read_text())
    doc["observation"]["version"] = SPEC_VERSION + 1
    (old / "policy.json").write_text(json.dumps(doc))
    (old / "weights.safetensors").write_bytes((path / "weights.safetensors").read_bytes())
    with pytest.raises(ValueError, match="observation spec version"):
        load_policy(old)
    # Weights that do not fit the description name the tensors.
    tensors = load_file(str(path / "weights.safetensors"))
    del tensors["action_net.bias"]
    save_file(tensors, str(old / "weights.safetensors"))
    doc["observation"]["version"] = SPEC_VERSION
    (old / "policy.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"missing tensors \['action_net.bias'\]"):
        load_policy(old)


def test_export_refuses_a_model_that_does_not_fit_the_env(tmp_path):
    other = {**KWARGS, "queue_slots": 4}
    model = MaskablePPO("MlpPolicy", DummyVecEnv([make_env(other, monitor=False)]), n_steps=64,
                        device="cpu")
    with pytest.raises(ValueError, match="does not fit the env"):
        export_sb3(model, KWARGS, tmp_path / "x")


def _context_config() -> dict:
    return env_configuration.env_config(KWARGS)


HANDWRITTEN = [
    lambda ctx: FixedGroups(groups=3, budget=256, staggered=True),
    lambda ctx: PaperRule(max_groups=5, unit=128),
    lambda ctx: SloAware(ctx, headroom=0.8, urgency=0.4),
    lambda ctx: RandomPolicy(seed=3, start_prob=0.7),
]


def _params(policy) -> dict:
    return {f.name: getattr(policy, f.name) for f in fields(policy)
            if f.init and f.name != "context"}


@pytest.mark.parametrize("build", HANDWRITTEN, ids=["fixed", "paper", "slo_aware", "random"])
def test_handwritten_round_trip_gives_identical_decisions(build, tmp_path):
    config = _context_config()
    context = env_configuration.policy_context(config)
    path = export_handwritten(build(context), config, tmp_path / "p")
    doc = json.loads((path / "policy.json").read_text())
    assert doc["kind"] == "handwritten" and not (path / "weights.safetensors").exists()
    assert doc["observation"] == config["observation"] and doc["actions"] == config["actions"]
    original, loaded = build(context), load_policy(path)
    assert type(loaded) is type(original) and _params(loaded) == _params(original)
    if isinstance(original, SloAware):
        assert asdict(loaded.context) == asdict(original.context)
    decisions = {}
    for who, policy in (("original", original), ("loaded", loaded)):
        env = gym.make(lpenv.ENV_ID, **KWARGS).unwrapped
        seen = []

        def record(view, policy=policy, seen=seen):
            decision = policy.decide(view)
            seen.append(decision)
            return decision

        env.reset(seed=SEEDS[0])
        env.episode.run(record)
        decisions[who] = seen
    assert decisions["loaded"] == decisions["original"] and len(decisions["loaded"]) > 5


def test_chunked_round_trip(tmp_path):
    config = {**KWARGS, "engine": {**KWARGS["engine"], "mode": "chunked"}}
    path = export_handwritten(ChunkedPrefill(chunk_tokens=256), config, tmp_path / "c")
    policy = load_policy(path)
    assert isinstance(policy, ChunkedPrefill) and policy.chunk_tokens == 256
    assert policy.mode == "chunked"
    assert json.loads((path / "policy.json").read_text())["env_config"]["engine"]["mode"] == \
        "chunked"


def test_handwritten_export_refuses_unknown_policies(tmp_path):
    class Custom:
        name, mode = "custom", "layered"

    with pytest.raises(ValueError, match="not an exportable hand-written policy"):
        export_handwritten(Custom(), KWARGS, tmp_path / "x")


def test_command_line(trained, tmp_path, capsys):
    model, venv, _, samples = trained
    model.save(tmp_path / "model.zip")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(venv.env_method("config_dict", indices=0)[0]))
    assert main(["--checkpoint", str(tmp_path / "model.zip"), "--env-config", str(config),
                 "--out", str(tmp_path / "learned")]) == 0
    policy = load_policy(tmp_path / "learned")
    for obs, mask in samples[:50]:
        expected, _ = model.predict(obs, action_masks=mask, deterministic=True)
        assert np.array_equal(policy.act(obs, mask), expected)
    kwargs = tmp_path / "kwargs.json"
    kwargs.write_text(json.dumps(KWARGS))  # gymnasium.make keyword arguments work too
    assert main(["--policy", "paper", "--params", '{"max_groups": 4}', "--env-config",
                 str(kwargs), "--out", str(tmp_path / "paper")]) == 0
    paper = load_policy(tmp_path / "paper")
    assert isinstance(paper, PaperRule) and paper.max_groups == 4
    with pytest.raises(SystemExit):
        main(["--policy", "paper", "--params", '{"groups": 4}', "--env-config", str(kwargs),
              "--out", str(tmp_path / "bad")])
    assert "bad parameters for policy 'paper'" in capsys.readouterr().err


@pytest.mark.parametrize("args,error", [
    (["--policy", "paper", "--params", '{"max_groups": 0}'],
     "bad parameters for policy 'paper': policy paper: max_groups must be a positive integer"),
    (["--policy", "paper", "--params", "{bad"], "--params is not JSON"),
    (["--checkpoint", "/nonexistent/model.zip"], "--checkpoint /nonexistent/model.zip is not"),
])
def test_command_line_says_what_is_wrong(tmp_path, capsys, args, error):
    """A usage error (exit 2) naming the argument, not a traceback."""
    kwargs = tmp_path / "kwargs.json"
    kwargs.write_text(json.dumps(KWARGS))
    with pytest.raises(SystemExit) as exc:
        main([*args, "--env-config", str(kwargs), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and error in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # an env config that is not there, or not JSON
        main(["--policy", "paper", "--env-config", str(tmp_path / "none.json"), "--out",
              str(tmp_path / "out")])
    assert exc.value.code == 2 and "--env-config" in capsys.readouterr().err


# ---- export and load hold a policy to what it means ----------------------------------------
CONF_POLICY = Path(__file__).resolve().parent.parent / "conf" / "policy"


@pytest.mark.parametrize("name", sorted(export.HANDWRITTEN))
def test_engine_defaults_are_the_hydra_configs(name):
    """What ``${engine.*}`` a policy's Hydra config interpolates, the export fills alike."""
    values = OmegaConf.load(CONF_POLICY / f"{name}.yaml")
    interpolated = {k: re.fullmatch(r"\$\{engine\.(\w+)\}", v).group(1)
                    for k, v in OmegaConf.to_container(values, resolve=False).items()
                    if isinstance(v, str) and v.startswith("${engine.")}
    assert getattr(export.HANDWRITTEN[name], "engine_defaults", {}) == interpolated


def test_command_line_takes_engine_defaults_from_the_env_config(tmp_path):
    """``lpenv-export --policy paper`` is ``lpenv-eval policy=paper`` on that engine: the unit
    follows its chunk_tokens (64 here, not the class's 512); --params still win."""
    kwargs = tmp_path / "kwargs.json"
    kwargs.write_text(json.dumps({**KWARGS, "engine": {**KWARGS["engine"], "chunk_tokens": 64}}))

    def export_(policy, params, out):
        assert main(["--policy", policy, "--params", params, "--env-config", str(kwargs),
                     "--out", str(tmp_path / out)]) == 0
        return json.loads((tmp_path / out / "policy.json").read_text())["policy"]["params"]

    assert export_("paper", '{"max_groups": 8}', "p") == {"max_groups": 8, "unit": 64}
    assert export_("paper", '{"max_groups": 8, "unit": 512}', "q")["unit"] == 512
    assert export_("chunked", "{}", "c") == {"chunk_tokens": 64}
    assert load_policy(tmp_path / "p") == PaperRule(max_groups=8, unit=64)


def _slo_context(config: dict, **changes) -> PolicyContext:
    return replace(env_configuration.policy_context(config), **changes)


def test_loading_refuses_what_the_policy_reads_with_both_values(trained, tmp_path):
    """Where a policy reads a setting of where it runs, an artifact made for another is
    refused, each field named with both values; where it only records it, a warning."""
    _, venv, path, _ = trained
    config = venv.env_method("config_dict", indices=0)[0]
    context = env_configuration.policy_context(config)
    engine = config["engine"]
    slo_aware = export_handwritten(SloAware(context), config, tmp_path / "slo_aware")
    paper = export_handwritten(PaperRule(max_groups=4), config, tmp_path / "paper")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # where everything fits: not a word
        for artifact in (path, slo_aware, paper):
            load_policy(artifact, expect={"context": context, "engine": engine})
            load_policy(artifact, expect=config)
    # The SLOs: a learned policy's observation is normalized by them, SLO-aware aims at them.
    tighter = _slo_context(config, tbt_slo_s=0.05)
    for artifact in (path, slo_aware):
        with pytest.raises(ValueError, match=r"observation\.tbt_slo_s: artifact 0\.0045, "
                                             r"expected 0\.05"):
            load_policy(artifact, expect={"context": tighter})
    with pytest.raises(ValueError, match=r"observation\.ttft_slo_s: artifact 0\.02, expected 1"):
        load_policy(path, expect={"slo": {"ttft_s": 1.0, "tbt_s": 0.0045}})
    # The engine: the learned policy's budget, max_num_seqs and max_model_len, all named.
    other = {**engine, "prefill_budget": 1024, "max_num_seqs": 32, "max_model_len": 512}
    with pytest.raises(ValueError) as err:
        load_policy(path, expect={"engine": other})
    for field in ("prefill_budget", "max_num_seqs", "max_model_len"):
        have = config["observation"][field]
        assert f"observation.{field}: artifact {have}, expected {other[field]}" in str(err.value)
    # SLO-aware prices with its profile: another one is refused too.
    with pytest.raises(ValueError, match=r"hardware: artifact 'cpu-generic', expected 'h100-sxm'"):
        load_policy(slo_aware, expect={"context": _slo_context(config, hardware="h100-sxm")})
    # Every policy counts G in its model's layers: another model is refused.
    with pytest.raises(ValueError, match=r"observation\.num_layers: artifact 5, expected 8"):
        load_policy(paper, expect={"context": replace(context, model=ModelConfig.load(
            "qwen3-moe-cpu"))})
    # The paper rule reads none of the rest: it runs as exported, and says so.
    with pytest.warns(artifact_fit.ArtifactMismatch, match=r"tbt_slo_s: artifact 0\.0045, expected "
                                                     r"0\.05.*prefill_budget: artifact 512"):
        loaded = load_policy(paper, expect={"context": tighter, "engine": other})
    assert loaded == PaperRule(max_groups=4)


@pytest.mark.parametrize("case,error", [
    ("slo_not_a_number", "--env-config CONFIG: slo.ttft_s: Value 'abc'"),
    ("config_is_a_list", "--env-config CONFIG: an env configuration is a mapping"),
    ("spec_not_its_sections", "observation.tbt_slo_s: 1.0, its sections give 0.0045"),
    ("checkpoint_not_a_zip", "--checkpoint CONFIG is not a stable-baselines3 model"),
    ("out_is_a_file", "--out OUT is a file"),
])
def test_command_line_bad_inputs_are_usage_errors(tmp_path, capsys, case, error):
    """Each a usage error (exit 2) saying what is wrong, not a traceback or a silent export."""
    config, out = tmp_path / "config.json", tmp_path / "out"
    good = env_configuration.env_config(KWARGS)
    doc = {"slo_not_a_number": {**KWARGS, "slo": {"ttft_s": "abc", "tbt_s": 0.1}},
           "config_is_a_list": [],
           "spec_not_its_sections": {**good, "observation": {**good["observation"],
                                                             "tbt_slo_s": 1.0}}}.get(case, good)
    config.write_text(json.dumps(doc))
    args = ["--policy", "paper"]
    if case == "checkpoint_not_a_zip":
        args = ["--checkpoint", str(config)]
    if case == "out_is_a_file":
        out.write_text("")
    with pytest.raises(SystemExit) as exc:
        main([*args, "--env-config", str(config), "--out", str(out)])
    message = capsys.readouterr().err
    assert exc.value.code == 2, message
    assert error.replace("CONFIG", str(config)).replace("OUT", str(out)) in message
