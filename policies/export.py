"""Exported policies: a folder the server loads without the training stack.

An artifact is a folder with

* ``policy.json``: ``format`` ("lpenv-policy") and ``format_version``; ``kind`` ("learned" or
  "handwritten"); ``observation`` (``ObservationSpec.to_json()``, with its ``version``);
  ``actions`` (``ActionCodec.to_json()``); ``env_config`` (the env configuration it was trained
  or tuned under: engine, workload, SLO, reward, backend, actions, observation, horizon);
  for ``learned``: ``network`` (``NetworkSpec``: input size, hidden sizes, activation, output
  slices) and ``weights`` (the file name); for ``handwritten``: ``policy`` (``name`` and
  ``params``);
* ``weights.safetensors`` (learned only): the actor's tensors, named as ``ActorMLP``'s
  ``state_dict()`` (``policy_net.0.weight``, ..., ``action_net.bias``), float32.

``load_policy`` reads JSON and safetensors only: nothing is unpickled. Hand-written policies
are rebuilt from their parameters; ``SloAware``'s context from the model name, SLOs and
hardware profile of ``env_config``.

Command line (``lpenv-export``)::

    lpenv-export --checkpoint model.zip --env-config config.json --out DIR   # an SB3 model
    lpenv-export --policy paper --params '{"max_groups": 8}' --env-config config.json --out DIR

``config.json`` is ``env.unwrapped.config_dict()`` (what ``lpenv-train`` writes as
``env_config.json``) or the keyword arguments of ``gymnasium.make``, checked as ``lpenv-eval``
checks its config. A parameter that a policy's Hydra config takes from the engine (``paper``'s
``unit`` and ``chunked``'s ``chunk_tokens``: ``${engine.chunk_tokens}``) defaults to that
engine's here too, so the artifact holds the policy ``lpenv-eval policy=NAME`` runs there;
``--params`` win, and the parameters recorded are the ones used.

``load_policy(path, expect=...)`` holds an artifact to where it is loaded (``check_expect``):
what the policy reads there (a learned policy's observation spec and action map, the
SLO-aware heuristic's SLOs, model, dtype and hardware profile, every policy's layer count) must
match, or loading is refused naming each field with both values; what it does not read only
warns (``ArtifactMismatch``).
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lpenv.actions import ActionCodec
from lpenv.observation import SPEC_VERSION, ObservationSpec
from policies.artifact_fit import check_expect
from policies.chunked import ChunkedPrefill
from policies.env_configuration import env_config, normalize_config, policy_context
from policies.fixed import FixedGroups
from policies.learned import ACTIVATIONS, ActorMLP, LearnedPolicy, NetworkSpec
from policies.paper_rule import PaperRule
from policies.protocol import Policy
from policies.random_policy import RandomPolicy
from policies.slo_aware import SloAware

FORMAT, FORMAT_VERSION = "lpenv-policy", 1
POLICY_JSON, WEIGHTS = "policy.json", "weights.safetensors"
KINDS = ("learned", "handwritten")
HANDWRITTEN: dict[str, type] = {"fixed": FixedGroups, "paper": PaperRule, "slo_aware": SloAware,
                                "random": RandomPolicy, "chunked": ChunkedPrefill}
# Dataclass fields of the hand-written policies that are not parameters.
_NOT_PARAMS = {"name", "mode", "context"}
# ---- export -------------------------------------------------------------------------------
def _write(path: str | Path, doc: dict, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file, not an artifact folder")
    path.mkdir(parents=True, exist_ok=True)
    if tensors is not None:
        save_file(tensors, str(path / WEIGHTS), metadata={"format": FORMAT})
    elif (path / WEIGHTS).exists():
        (path / WEIGHTS).unlink()  # a stale learned artifact's weights
    (path / POLICY_JSON).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return path


def _header(kind: str, config: dict) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
            "observation": config["observation"], "actions": config["actions"],
            "env_config": config}


def sb3_actor(model: Any) -> tuple[NetworkSpec, dict[str, torch.Tensor]]:
    """The actor of an SB3 ``PPO``/``MaskablePPO`` policy on Box -> MultiDiscrete: its
    description and float32 tensors named as ``ActorMLP``'s. Refuses what the artifact
    cannot express (a features extractor with weights, observation normalization)."""
    from gymnasium import spaces
    from stable_baselines3.common.torch_layers import FlattenExtractor

    policy = model.policy
    if not isinstance(policy.action_space, spaces.MultiDiscrete):
        raise ValueError(f"expected a MultiDiscrete action space, got {policy.action_space}")
    if not isinstance(policy.observation_space, spaces.Box):
        raise ValueError(f"expected a Box observation space, got {policy.observation_space}")
    extractors = [getattr(policy, a, None) for a in ("features_extractor", "pi_features_extractor")]
    if any(e is not None and not isinstance(e, FlattenExtractor) for e in extractors):
        raise ValueError("only the default FlattenExtractor can be exported (the artifact "
                         "holds an MLP on the raw observation)")
    if model.get_vec_normalize_env() is not None:
        raise ValueError("VecNormalize observation statistics are not part of the artifact; "
                         "train without VecNormalize (the observation is normalized already)")
    net = policy.mlp_extractor.policy_net
    names = {cls: name for name, cls in ACTIVATIONS.items()}
    hidden, acts = [], set()
    modules = list(net)
    for i in range(0, len(modules), 2):
        lin, act = modules[i], modules[i + 1] if i + 1 < len(modules) else None
        if not isinstance(lin, torch.nn.Linear) or type(act) not in names:
            raise ValueError(f"unexpected policy_net layout {net}: expected Linear, activation…")
        hidden.append(lin.out_features)
        acts.add(names[type(act)])
    if len(acts) > 1:
        raise ValueError(f"policy_net mixes activations {sorted(acts)}")
    activation = acts.pop() if acts else names.get(policy.activation_fn, "tanh")
    spec = NetworkSpec(int(np.prod(policy.observation_space.shape)), tuple(hidden), activation,
                       tuple(int(n) for n in policy.action_space.nvec))
    state = {f"policy_net.{k}": v for k, v in net.state_dict().items()}
    state |= {f"action_net.{k}": v for k, v in policy.action_net.state_dict().items()}
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    expected = spec.tensor_shapes()
    if {k: tuple(v.shape) for k, v in tensors.items()} != expected:
        raise ValueError(f"actor tensors {sorted(tensors)} do not match {sorted(expected)}")
    return spec, tensors


def learned_from_sb3(model: Any, config: Mapping) -> LearnedPolicy:
    """A ``LearnedPolicy`` from an SB3 model in memory (for evaluation during training)."""
    c = normalize_config(config)
    spec, tensors = sb3_actor(model)
    net = ActorMLP(spec)
    net.load_state_dict(tensors)
    return LearnedPolicy(ObservationSpec(**c["observation"]), _codec(c["actions"]), net)


def export_sb3(model: Any, env: Any, path: str | Path, timesteps: int | None = None) -> Path:
    """Write an SB3 PPO/MaskablePPO model's actor as an artifact folder at ``path``.

    ``env``: the env it was trained on (gym env, VecEnv) or its configuration mapping;
    ``timesteps``: the steps the actor had trained (default: the model's)."""
    config = env_config(env)
    spec, tensors = sb3_actor(model)
    obs_spec, codec = ObservationSpec(**config["observation"]), _codec(config["actions"])
    if spec.input_dim != obs_spec.size or list(spec.output_dims) != codec.nvec:
        raise ValueError(f"the model (observation {spec.input_dim}, actions "
                         f"{list(spec.output_dims)}) does not fit the env (observation "
                         f"{obs_spec.size}, actions {codec.nvec})")
    doc = _header("learned", config)
    doc |= {"network": spec.to_json(), "weights": WEIGHTS,
            "training": {"algorithm": type(model).__name__,
                         "num_timesteps": int(model.num_timesteps if timesteps is None
                                               else timesteps)}}
    return _write(path, doc, tensors)


def engine_defaults(name: str, config: Mapping) -> dict:
    """A hand-written policy's parameters whose default is an engine setting, from a
    normalized env configuration: ``lpenv-export --policy paper`` is ``lpenv-eval
    policy=paper`` on that engine (its Hydra config says ``unit: ${engine.chunk_tokens}``)."""
    settings = getattr(HANDWRITTEN[name], "engine_defaults", {})
    return {param: config["engine"][setting] for param, setting in settings.items()}


def handwritten_params(policy: Any) -> tuple[str, dict]:
    """A hand-written policy's registry name and its parameters (dataclass fields)."""
    name = getattr(policy, "name", None)
    if name not in HANDWRITTEN or not isinstance(policy, HANDWRITTEN[name]):
        raise ValueError(f"not an exportable hand-written policy: {policy!r}; known: "
                         f"{', '.join(f'{n} ({c.__name__})' for n, c in HANDWRITTEN.items())}")
    assert is_dataclass(policy)
    params = {f.name: getattr(policy, f.name) for f in fields(policy)
              if f.init and f.name not in _NOT_PARAMS}
    try:
        json.dumps(params, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} parameters {params} are not JSON: {exc}") from None
    return name, params


def export_handwritten(policy: Policy, context_config: Mapping, path: str | Path) -> Path:
    """Write a hand-written policy (FixedGroups, PaperRule, SloAware, RandomPolicy,
    ChunkedPrefill) as an artifact; ``context_config`` is the env configuration it runs
    under (``SloAware`` takes its model, SLOs and hardware from it on load)."""
    name, params = handwritten_params(policy)
    config = normalize_config(context_config)
    doc = _header("handwritten", config) | {"policy": {"name": name, "params": params}}
    return _write(path, doc)


# ---- load ---------------------------------------------------------------------------------
def read_artifact(path: str | Path) -> dict:
    """``policy.json`` of an artifact folder (or the file itself), checked for its format."""
    path = Path(path)
    file = path / POLICY_JSON if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no {POLICY_JSON} at {path}")
    doc = json.loads(file.read_text())
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{file} is not an {FORMAT} artifact (format {doc.get('format')!r})")
    if doc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {doc.get('format_version')!r}, this code "
                         f"reads {FORMAT_VERSION}")
    missing = [k for k in ("kind", "observation", "actions", "env_config") if k not in doc]
    missing += {"learned": [k for k in ("network", "weights") if k not in doc],
                "handwritten": [] if "policy" in doc else ["policy"]}.get(doc.get("kind"), [])
    if missing:
        raise ValueError(f"{file}: missing fields {missing}")
    if doc["kind"] not in KINDS:
        raise ValueError(f"{file}: kind {doc['kind']!r} is not one of {KINDS}")
    return doc


def _codec(d: Mapping) -> ActionCodec:
    return ActionCodec(tuple(int(g) for g in d["group_choices"]), int(d["admission_levels"]),
                       bool(d["allow_stagger"]))


def _obs_spec(d: Mapping) -> ObservationSpec:
    if d.get("version") != SPEC_VERSION:
        raise ValueError(f"observation spec version {d.get('version')!r} in the artifact, this "
                         f"code encodes version {SPEC_VERSION}: re-export or retrain")
    known = {f.name for f in fields(ObservationSpec)}
    if set(d) != known:
        raise ValueError(f"observation spec fields: missing {sorted(known - set(d))}, unknown "
                         f"{sorted(set(d) - known)}")
    return ObservationSpec(**d)


def _load_learned(path: Path, doc: dict) -> LearnedPolicy:
    spec = NetworkSpec.from_json(doc["network"])
    file = path / doc["weights"]
    if not file.is_file():
        raise FileNotFoundError(f"{file} (the artifact's weights) does not exist")
    tensors = load_file(str(file))  # safetensors: a JSON header and raw buffers, no pickle
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    expected = spec.tensor_shapes()
    if shapes != expected:
        missing = sorted(set(expected) - set(shapes))
        unexpected = sorted(set(shapes) - set(expected))
        wrong = sorted(k for k in set(shapes) & set(expected) if shapes[k] != expected[k])
        raise ValueError(f"{file}: missing tensors {missing}, unexpected {unexpected}, wrong "
                         f"shapes {[(k, shapes[k], expected[k]) for k in wrong]}")
    net = ActorMLP(spec)
    net.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()})
    return LearnedPolicy(_obs_spec(doc["observation"]), _codec(doc["actions"]), net)


def _load_handwritten(doc: dict) -> Policy:
    name, params = doc["policy"]["name"], dict(doc["policy"].get("params", {}))
    if name not in HANDWRITTEN:
        raise ValueError(f"unknown hand-written policy {name!r}; known: {sorted(HANDWRITTEN)}")
    cls = HANDWRITTEN[name]
    try:
        if cls is SloAware:
            return SloAware(policy_context(doc["env_config"]), **params)
        return cls(**params)
    except TypeError as exc:
        raise ValueError(f"bad parameters for policy {name!r}: {exc}") from None


def load_policy(path: str | Path, expect: Mapping | None = None) -> Policy:
    """The policy of an artifact folder, from JSON and safetensors only (never pickle).

    ``expect``: where it is loaded (see ``check_expect``); ``lpenv-eval`` gives
    ``{"context": context, "engine": engine}``. A difference the policy reads (a learned
    policy's observation spec or action map, SLO-aware's SLOs, model or hardware) is a
    ValueError naming each field with both values; one it does not read, a warning."""
    path = Path(path)
    doc = read_artifact(path)
    if expect:
        check_expect(doc, expect)
    if doc["kind"] == "learned":
        return _load_learned(path if path.is_dir() else path.parent, doc)
    return _load_handwritten(doc)


# ---- command line -------------------------------------------------------------------------
def sb3_algorithm(checkpoint: str | Path) -> str:
    """``maskable_ppo`` or ``ppo``, from the policy class an SB3 zip records."""
    with zipfile.ZipFile(checkpoint) as z:
        data = json.loads(z.read("data"))
    module = str(data.get("policy_class", {}).get("__module__", ""))
    return "maskable_ppo" if "maskable" in module else "ppo"


def load_sb3(checkpoint: str | Path, algo: str = "auto") -> Any:
    """An SB3 checkpoint (the training stack: this unpickles, unlike ``load_policy``)."""
    algo = sb3_algorithm(checkpoint) if algo == "auto" else algo
    if algo == "maskable_ppo":
        from sb3_contrib import MaskablePPO

        return MaskablePPO.load(checkpoint, device="cpu")
    if algo == "ppo":
        from stable_baselines3 import PPO

        return PPO.load(checkpoint, device="cpu")
    raise ValueError(f"algo must be auto, maskable_ppo or ppo, got {algo!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lpenv-export", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a stable-baselines3 PPO/MaskablePPO .zip")
    src.add_argument("--policy", choices=sorted(HANDWRITTEN), help="a hand-written policy")
    p.add_argument("--params", default="{}", help="hand-written policy parameters, JSON")
    p.add_argument("--algo", default="auto", choices=("auto", "maskable_ppo", "ppo"))
    p.add_argument("--env-config", required=True,
                   help="JSON: env.unwrapped.config_dict() or gymnasium.make keyword arguments")
    p.add_argument("--out", required=True, help="artifact folder to write")
    args = p.parse_args(argv)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} is a file: give a folder (new, or an artifact to replace)")
    try:
        config = normalize_config(json.loads(Path(args.env_config).read_text()))
    except (OSError, ValueError) as exc:  # (bad JSON, a bad value, a backend it refuses)
        p.error(f"--env-config {args.env_config}: {exc}")
    try:
        if args.checkpoint:
            out = export_sb3(_checkpoint(p, args.checkpoint, args.algo), config, args.out)
        else:
            out = export_handwritten(_handwritten(p, args.policy, args.params, config), config,
                                     args.out)
    except ValueError as exc:  # a model that does not fit the env, or cannot be exported
        p.error(str(exc))
    except OSError as exc:
        p.error(f"--out {args.out}: {exc}")
    policy = load_policy(out)  # what the server will load: check it does
    print(f"wrote {out / POLICY_JSON}: {policy!r}")
    return 0


def _checkpoint(p: argparse.ArgumentParser, checkpoint: str, algo: str) -> Any:
    if not Path(checkpoint).is_file():
        p.error(f"--checkpoint {checkpoint} is not a file")
    try:
        with zipfile.ZipFile(checkpoint) as z:
            z.getinfo("data")  # what SB3 saves its class and settings in
    except (zipfile.BadZipFile, KeyError):
        p.error(f"--checkpoint {checkpoint} is not a stable-baselines3 model (.zip from "
                f"model.save)")
    return load_sb3(checkpoint, algo)


def _handwritten(p: argparse.ArgumentParser, name: str, text: str, config: dict) -> Policy:
    try:
        params = json.loads(text)
    except ValueError as exc:
        p.error(f"--params is not JSON ({exc}): {text!r}")
    if not isinstance(params, dict):
        p.error(f"--params must be a JSON object, got {text!r}")
    params = {**engine_defaults(name, config), **params}  # explicit --params win
    cls = HANDWRITTEN[name]
    try:
        return SloAware(policy_context(config), **params) if cls is SloAware else cls(**params)
    except (TypeError, ValueError) as exc:  # unknown names, values out of range
        p.error(f"bad parameters for policy {name!r}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
