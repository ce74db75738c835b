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
``env_config.json``) or the keyword arguments of ``gymnasium.make``.
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

from engine_adapter.config import EngineConfig
from engine_adapter.model_config import ModelConfig
from lpenv.actions import ActionCodec
from lpenv.observation import SPEC_VERSION, ObservationSpec
from policies.chunked import ChunkedPrefill
from policies.fixed import FixedGroups
from policies.learned import ACTIVATIONS, ActorMLP, LearnedPolicy, NetworkSpec
from policies.paper_rule import PaperRule
from policies.protocol import Policy, PolicyContext
from policies.random_policy import RandomPolicy
from policies.slo_aware import SloAware

FORMAT, FORMAT_VERSION = "lpenv-policy", 1
POLICY_JSON, WEIGHTS = "policy.json", "weights.safetensors"
KINDS = ("learned", "handwritten")
HANDWRITTEN: dict[str, type] = {"fixed": FixedGroups, "paper": PaperRule, "slo_aware": SloAware,
                                "random": RandomPolicy, "chunked": ChunkedPrefill}
# Dataclass fields of the hand-written policies that are not parameters.
_NOT_PARAMS = {"name", "mode", "context"}
# Keys of an env configuration that an ``expect`` may carry but that do not bind a policy.
_FREE_KEYS = {"engine", "workload", "slo", "reward", "backend", "horizon_s", "max_decisions"}


# ---- env configurations -------------------------------------------------------------------
def env_config(env: Any) -> dict:
    """The configuration an artifact records, from an env (wrapped or not), a VecEnv, or a
    mapping (``config_dict()`` output or ``gymnasium.make`` keyword arguments)."""
    if isinstance(env, Mapping):
        return normalize_config(env)
    if hasattr(env, "env_method"):  # a stable-baselines3 VecEnv
        return _to_plain(env.env_method("config_dict", indices=0)[0])
    return _to_plain(env.unwrapped.config_dict())


def _to_plain(value: Any) -> Any:
    """Plain JSON types from nested mappings and sequences (OmegaConf's included)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return value
    return [_to_plain(v) for v in value]


def normalize_config(config: Mapping) -> dict:
    """A ``config_dict()``-shaped configuration from either accepted form."""
    config = _to_plain(config)
    if "observation" in config and "actions" in config:
        return config
    from lpenv.env import LayeredPrefillEnv  # builds specs only; the model is built on reset

    kwargs = dict(config)
    engine = dict(kwargs.get("engine") or {})
    chunked = engine.get("mode") == "chunked"
    if chunked:  # the chunked baseline: the specs are recorded as for layered mode
        kwargs["engine"] = {**engine, "mode": "layered"}
    env = LayeredPrefillEnv(**kwargs)
    out = env_config(env)
    if chunked:
        out["engine"]["mode"] = "chunked"
    return out


def env_kwargs(config: Mapping) -> dict:
    """``gymnasium.make`` keyword arguments that rebuild the env a configuration describes."""
    c = normalize_config(config)
    obs, acts = c["observation"], c["actions"]
    return {"engine": c["engine"], "workload": c["workload"], "slo": c["slo"],
            "reward": c["reward"], "backend": c["backend"],
            "group_choices": list(acts["group_choices"]),
            "admission_levels": acts["admission_levels"],
            "allow_stagger": acts["allow_stagger"], "queue_slots": obs["queue_slots"],
            "rate_scale": obs["rate_scale"], "energy_scale": obs["energy_scale"],
            "horizon_s": c.get("horizon_s"), "max_decisions": c.get("max_decisions")}


def policy_context(config: Mapping) -> PolicyContext:
    """What a hand-written policy may know: model, SLOs, hardware profile, dtype size."""
    engine = EngineConfig(**config.get("engine", {}))
    return PolicyContext(ModelConfig.load(engine.model), float(config["slo"]["ttft_s"]),
                         float(config["slo"]["tbt_s"]),
                         hardware=config.get("backend", {}).get("hardware", "cpu-generic"),
                         dtype_bytes=engine.torch_dtype.itemsize)


# ---- export -------------------------------------------------------------------------------
def _write(path: str | Path, doc: dict, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    path = Path(path)
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


def export_sb3(model: Any, env: Any, path: str | Path) -> Path:
    """Write an SB3 PPO/MaskablePPO model's actor as an artifact folder at ``path``.

    ``env``: the env it was trained on (gym env, VecEnv) or its configuration mapping."""
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
                         "num_timesteps": int(model.num_timesteps)}}
    return _write(path, doc, tensors)


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


def _plain(value: Any) -> Any:
    if hasattr(value, "to_json"):
        value = value.to_json()
    return json.loads(json.dumps(value))  # tuples -> lists, as in the artifact


def check_expect(doc: dict, expect: Mapping) -> None:
    """Raise ValueError naming every field where the artifact differs from ``expect``.

    ``expect`` may hold ``observation`` (an ObservationSpec or its dict, or part of it),
    ``actions`` (an ActionCodec or its dict, or part of it), ``num_layers`` and
    ``spec_version``; a whole env configuration (``config_dict()``) is accepted too, its
    engine/workload/SLO/reward/backend keys are not compared (SLOs bind through the
    observation spec). Hand-written artifacts are checked the same way: their SLOs and layer
    count are in the spec they were exported under."""
    problems = []

    def compare(section: str, have: dict, want: Mapping) -> None:
        for key, value in _plain(want).items():
            if key not in have:
                problems.append(f"{section}.{key}: artifact has none, expected {value!r}")
            elif have[key] != value:
                problems.append(f"{section}.{key}: artifact {have[key]!r}, expected {value!r}")

    for key, value in expect.items():
        if key == "observation":
            compare("observation", doc["observation"], value)
        elif key == "actions":
            compare("actions", doc["actions"], value)
        elif key == "num_layers":
            compare("observation", doc["observation"], {"num_layers": value})
        elif key in ("spec_version", "version"):
            compare("observation", doc["observation"], {"version": value})
        elif key not in _FREE_KEYS:
            raise ValueError(f"unknown expect key {key!r}; known: observation, actions, "
                             f"num_layers, spec_version (and env-config keys {sorted(_FREE_KEYS)})")
    if problems:
        raise ValueError("the policy artifact does not fit where it is loaded: "
                         + "; ".join(problems))


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

    ``expect``: what the loading side runs (see ``check_expect``); a mismatch in spec version,
    observation spec or action map is a ValueError naming the fields."""
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
    try:
        config = normalize_config(json.loads(Path(args.env_config).read_text()))
    except (OSError, ValueError) as exc:  # (a JSONDecodeError is a ValueError)
        p.error(f"--env-config {args.env_config}: {exc}")
    if args.checkpoint:
        if not Path(args.checkpoint).is_file():
            p.error(f"--checkpoint {args.checkpoint} is not a file")
        out = export_sb3(load_sb3(args.checkpoint, args.algo), config, args.out)
    else:
        try:
            params = json.loads(args.params)
        except ValueError as exc:
            p.error(f"--params is not JSON ({exc}): {args.params!r}")
        if not isinstance(params, dict):
            p.error(f"--params must be a JSON object, got {args.params!r}")
        cls = HANDWRITTEN[args.policy]
        try:
            policy = (SloAware(policy_context(config), **params) if cls is SloAware
                      else cls(**params))
        except (TypeError, ValueError) as exc:  # unknown names, values out of range
            p.error(f"bad parameters for policy {args.policy!r}: {exc}")
        out = export_handwritten(policy, config, args.out)
    policy = load_policy(out)  # what the server will load: check it does
    print(f"wrote {out / POLICY_JSON}: {policy!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
