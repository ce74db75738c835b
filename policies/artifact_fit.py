"""Whether a policy artifact fits where it is loaded (``load_policy(path, expect=...)``):
what the policy reads there must match the settings it was exported under, or loading is
refused naming each field with both values; what it only records warns."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass, replace
from typing import Any

from engine_adapter.config import EngineConfig
from engine_adapter.engine import max_model_len
from engine_adapter.model_config import ModelConfig
from policies.env_configuration import plain, policy_context


class ArtifactMismatch(UserWarning):
    """An artifact loaded where settings it was exported under differ, but the policy does
    not read them: it runs as exported, and says so."""


# What a policy reads of where it runs, so that there a mismatch changes what it does and
# loading refuses it: every policy counts G in its model's layers; a learned actor sees
# observations normalized by its spec's SLOs, budget, max_num_seqs and max_model_len and acts
# through its action map; the SLO-aware heuristic prices its model's batches (dtype, hardware
# profile) against its SLOs. The other hand-written policies read no more (the view gives
# them the budget): other SLOs or another budget only warn.
_EVERY_POLICY_READS = {"observation.num_layers"}
_SLO_AWARE_READS = {"observation.ttft_slo_s", "observation.tbt_slo_s", "model", "dtype_bytes",
                    "hardware"}
# Keys of an env configuration that an ``expect`` may carry but that no policy reads.
_FREE_KEYS = {"workload", "reward", "horizon_s", "max_decisions"}


def _reads(doc: dict, field: str) -> bool | None:
    """Whether the artifact's policy reads ``field`` of where it runs (a mismatch is an
    error), only records it (a warning), or None: neither (not compared)."""
    spec = field.startswith(("observation.", "actions."))
    if doc["kind"] == "learned":
        return True if spec else None
    if field in _EVERY_POLICY_READS:
        return True
    if doc["policy"]["name"] == "slo_aware":
        return field in _SLO_AWARE_READS
    return False if spec else None


def _as_dict(value: Any) -> dict:
    return asdict(value) if is_dataclass(value) else dict(value)


def _expected(expect: Mapping) -> dict[str, Any]:
    """``expect`` as the artifact's fields: ``observation.*``, ``actions.*``, ``model``
    (a ModelConfig), ``dtype_bytes`` and ``hardware``."""
    out: dict[str, Any] = {}
    for key, value in expect.items():
        if value is None and key in ("engine", "context"):
            continue  # not known where it is loaded
        if key in ("observation", "actions"):
            out |= {f"{key}.{k}": v for k, v in plain(value).items()}
        elif key == "num_layers":
            out["observation.num_layers"] = value
        elif key in ("spec_version", "version"):
            out["observation.version"] = value
        elif key == "slo":
            slo = _as_dict(value)
            out |= {"observation.ttft_slo_s": slo["ttft_s"], "observation.tbt_slo_s": slo["tbt_s"]}
        elif key == "engine":
            engine = value if isinstance(value, EngineConfig) else EngineConfig(**_as_dict(value))
            model = ModelConfig.load(engine.model)
            out |= {"observation.prefill_budget": engine.prefill_budget,
                    "observation.max_num_seqs": engine.max_num_seqs,
                    "observation.max_model_len": max_model_len(engine, model),
                    "observation.num_layers": model.num_layers, "model": model,
                    "dtype_bytes": engine.torch_dtype.itemsize}
        elif key == "backend":
            if "hardware" in _as_dict(value):
                out["hardware"] = _as_dict(value)["hardware"]
        elif key == "hardware":
            out["hardware"] = value
        elif key == "context":  # a PolicyContext: what lpenv-eval gives every policy
            out |= {"observation.ttft_slo_s": value.ttft_slo_s,
                    "observation.tbt_slo_s": value.tbt_slo_s,
                    "observation.num_layers": value.model.num_layers, "model": value.model,
                    "hardware": value.hardware, "dtype_bytes": value.dtype_bytes}
        elif key not in _FREE_KEYS:
            raise ValueError(f"unknown expect key {key!r}; known: observation, actions, "
                             f"num_layers, spec_version, slo, engine, backend, hardware, "
                             f"context (and env-config keys {sorted(_FREE_KEYS)})")
    return out


def _same_model(a: ModelConfig, b: ModelConfig) -> bool:
    return replace(a, name="") == replace(b, name="")  # by shape: a folder or a name alike


def check_expect(doc: dict, expect: Mapping) -> None:
    """Compare an artifact with where it is loaded: a ValueError naming every field, with
    both values, where they differ and the policy reads it; an ``ArtifactMismatch`` warning
    where it only records it (a hand-written policy exported under other settings).

    ``expect`` may hold ``observation`` (an ObservationSpec or its dict, or part of it),
    ``actions`` (an ActionCodec or its dict, or part of it), ``num_layers``,
    ``spec_version``, ``slo`` (an SLO or ``{ttft_s, tbt_s}``), ``engine`` (an EngineConfig or
    its mapping: prefill budget, max_num_seqs, max_model_len, layers, model, dtype),
    ``backend`` or ``hardware`` (the cost-model profile) and ``context`` (a PolicyContext:
    SLOs, model, hardware, dtype); a whole env configuration (``config_dict()``) is accepted.
    What binds: every policy, its layer count; a learned policy, its observation spec and
    action map (the spec's own constants queue_slots, rate_scale and energy_scale only where
    ``observation`` names them); ``slo_aware``, its SLOs, model, dtype and hardware profile.
    The other hand-written policies read nothing else: a difference there is a warning."""
    problems: list[str] = []
    notes: list[str] = []
    context = None
    for field, want in _expected(expect).items():
        reads = _reads(doc, field)
        if reads is None:
            continue
        if field in ("model", "dtype_bytes", "hardware"):
            context = context or policy_context(doc["env_config"])
            have = getattr(context, field)
            if field == "model":
                same, have, want = _same_model(have, want), have.name, want.name
            else:
                same = have == want
        else:
            section, key = field.split(".", 1)
            if key not in doc[section]:
                (problems if reads else notes).append(f"{field}: artifact has none, expected "
                                                      f"{plain(want)!r}")
                continue
            have, want = doc[section][key], plain(want)
            same = have == want
        if not same:
            (problems if reads else notes).append(f"{field}: artifact {have!r}, expected {want!r}")
    name = doc["policy"]["name"] if doc["kind"] == "handwritten" else "learned"
    if problems:
        raise ValueError(f"the {name} policy artifact does not fit where it is loaded: "
                         + "; ".join(problems) + " (export or train it for these settings)")
    if notes:
        warnings.warn(f"the {name} policy artifact was exported under other settings: "
                      + "; ".join(notes) + f". It runs as exported: {name} does not read "
                      "them", ArtifactMismatch, stacklevel=3)
