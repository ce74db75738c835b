"""Env configurations, as an artifact records them and ``lpenv-export`` reads them: the
``config_dict()`` form (``env.unwrapped.config_dict()``, ``lpenv-train``'s ``env_config.json``)
or the keyword arguments of ``gymnasium.make``, each checked as ``lpenv-eval`` checks its
config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from engine_adapter.config import EngineConfig
from engine_adapter.model_config import ModelConfig
from policies.protocol import PolicyContext

# An env configuration: its sections, and the keys of the two forms it comes in.
_SECTIONS = ("engine", "workload", "slo", "reward", "backend")
_CONFIG_KEYS = {*_SECTIONS, "actions", "observation", "horizon_s", "max_decisions"}
_KWARGS = {*_SECTIONS, "group_choices", "admission_levels", "allow_stagger", "queue_slots",
           "horizon_s", "max_decisions", "rate_scale", "energy_scale"}


def env_config(env: Any) -> dict:
    """The configuration an artifact records, from an env (wrapped or not), a VecEnv, or a
    mapping (``config_dict()`` output or ``gymnasium.make`` keyword arguments)."""
    if isinstance(env, Mapping):
        return normalize_config(env)
    if hasattr(env, "env_method"):  # a stable-baselines3 VecEnv
        return plain(env.env_method("config_dict", indices=0)[0])
    return plain(env.unwrapped.config_dict())


def plain(value: Any) -> Any:
    """Plain JSON types from nested mappings and sequences (OmegaConf's included) and from
    what has a ``to_json`` (specs, codecs): as an artifact records them."""
    if hasattr(value, "to_json"):
        value = value.to_json()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return value
    return [plain(v) for v in value]


def normalize_config(config: Mapping) -> dict:
    """A ``config_dict()``-shaped configuration from either accepted form, checked: a value
    of the wrong type or out of range is a ValueError naming its key, and a ``config_dict()``
    must be what its own sections build (its spec is what a policy will be held to)."""
    if not isinstance(config, Mapping):
        raise ValueError(f"an env configuration is a mapping of its sections (engine, "
                         f"workload, slo, ...), got {type(config).__name__}")
    config = plain(config)
    if "observation" in config and "actions" in config:
        unknown = sorted(set(config) - _CONFIG_KEYS)
        if unknown:
            raise ValueError(f"unknown env configuration key(s) {unknown}; known: "
                             f"{sorted(_CONFIG_KEYS)}")
        built = _build(_kwargs(config))
        changed = _differences(config, built)
        if changed:
            raise ValueError("the configuration's spec is not the one its sections build: "
                             + "; ".join(changed))
        return config
    return _build(config)


def _build(kwargs: dict) -> dict:
    """``config_dict()`` of the env that ``gymnasium.make`` keyword arguments build."""
    from lpenv.env import LayeredPrefillEnv  # builds specs only; the model is built on reset

    unknown = sorted(set(kwargs) - _KWARGS)
    if unknown:
        raise ValueError(f"unknown env argument(s) {unknown}; known: {sorted(_KWARGS)}")
    kwargs = {**kwargs, **{name: _typed(name, kwargs[name]) for name in _SECTIONS
                           if isinstance(kwargs.get(name), Mapping)}}
    engine = dict(kwargs.get("engine") or {})
    chunked = engine.get("mode") == "chunked"
    if chunked:  # the chunked baseline: the specs are recorded as for layered mode
        kwargs["engine"] = {**engine, "mode": "layered"}
    try:
        env = LayeredPrefillEnv(**kwargs)
    except TypeError as exc:  # a section that is not a mapping, a value of the wrong type
        raise ValueError(str(exc)) from None
    out = env_config(env)
    if chunked:
        out["engine"]["mode"] = "chunked"
    return out


def _typed(name: str, section: Mapping) -> dict:
    """A section's values checked against its schema (Hydra's, so export reads them as
    lpenv-eval does): a wrong type is a ValueError naming the key; numbers given as strings
    become numbers. Keys not given stay so (the env's defaults apply)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from lpenv.config_schema import SECTIONS

    try:
        checked = OmegaConf.merge(OmegaConf.structured(SECTIONS[name]), dict(section))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        raise ValueError(f"{name}{f'.{key}' if key else ''}: "
                         f"{str(exc).splitlines()[0]}") from None
    values = OmegaConf.to_container(checked)
    return {k: values[k] for k in section}


def _differences(given: Any, built: Any, where: str = "") -> list[str]:
    """Each leaf where two plain configurations differ, by its dotted key."""
    if isinstance(given, dict) and isinstance(built, dict):
        return [d for k in sorted(set(given) | set(built))
                for d in _differences(given.get(k), built.get(k), f"{where}{k}.")]
    if given == built:
        return []
    return [f"{where[:-1]}: {given!r}, its sections give {built!r}"]


def _kwargs(c: Mapping) -> dict:
    obs, acts = c["observation"], c["actions"]
    return {"engine": c["engine"], "workload": c["workload"], "slo": c["slo"],
            "reward": c["reward"], "backend": c["backend"],
            "group_choices": list(acts["group_choices"]),
            "admission_levels": acts["admission_levels"],
            "allow_stagger": acts["allow_stagger"], "queue_slots": obs["queue_slots"],
            "rate_scale": obs["rate_scale"], "energy_scale": obs["energy_scale"],
            "horizon_s": c.get("horizon_s"), "max_decisions": c.get("max_decisions")}


def env_kwargs(config: Mapping) -> dict:
    """``gymnasium.make`` keyword arguments that rebuild the env a configuration describes."""
    return _kwargs(normalize_config(config))


def policy_context(config: Mapping) -> PolicyContext:
    """What a hand-written policy may know: model, SLOs, hardware profile, dtype size."""
    engine = EngineConfig(**config.get("engine", {}))
    return PolicyContext(ModelConfig.load(engine.model), float(config["slo"]["ttft_s"]),
                         float(config["slo"]["tbt_s"]),
                         hardware=config.get("backend", {}).get("hardware", "cpu-generic"),
                         dtype_bytes=engine.torch_dtype.itemsize)
