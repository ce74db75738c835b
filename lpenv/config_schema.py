"""Structured configs: the schema Hydra checks ``conf/`` and every command-line override against.

Each section maps field for field onto the dataclass its consumer takes:

=========== =====================================================
``engine``   ``engine_adapter.config.EngineConfig``
``workload`` ``lpenv.workload.WorkloadConfig``
``slo``      ``lpenv.reward.SLO``
``reward``   ``lpenv.reward.RewardConfig``
``backend``  ``lpenv.backends.BackendConfig``
=========== =====================================================

so ``gymnasium.make("lpenv/LayeredPrefill-v1", engine=cfg.engine, ...)`` and ``lpenv-eval`` take
the same sections. The schemas are generated from those dataclasses (same names, types and
defaults; a field added there appears here), because OmegaConf makes a frozen dataclass's node
read-only, so the frozen ones cannot serve as schemas themselves. An unknown key or a value of
the wrong type fails when the config is composed (``Key 'prefill_budgt' not in
'EngineSchema'``, ``full_key: engine.prefill_budgt``); the dataclasses' own checks (a mode that
does not exist, a negative rate) run when :func:`to_dataclass` builds the real object.

``policy`` has one schema per registered policy (``FixedPolicySchema`` ...), generated from
the policy's dataclass, whose fields are its parameters; each ``conf/policy/*.yaml`` names
its schema in its defaults list.
``model`` and ``hardware`` are config groups that write into ``engine`` (and ``backend``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from engine_adapter.config import EngineConfig
from lpenv.backends import BackendConfig
from lpenv.reward import SLO, RewardConfig
from lpenv.sections import build_section
from lpenv.workload import WorkloadConfig
from policies.chunked import ChunkedPrefill
from policies.fixed import FixedGroups
from policies.paper_rule import PaperRule
from policies.random_policy import RandomPolicy
from policies.slo_aware import SloAware


def _schema_of(cls: type, name: str, skip: tuple[str, ...] = (), base: type | None = None,
               defaults: dict[str, Any] | None = None) -> type:
    """A mutable dataclass with ``cls``'s init fields, types and defaults (no validation),
    less ``skip``, deriving from ``base``, with ``defaults`` overriding ``cls``'s."""
    hints = typing.get_type_hints(cls)
    spec = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip:
            continue
        if defaults and f.name in defaults:
            default = field(default=defaults[f.name])
        elif f.default is not dataclasses.MISSING:
            default = field(default=f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = field(default_factory=f.default_factory)
        else:
            default = field(default=MISSING)  # required: the config must set it
        spec.append((f.name, hints[f.name], default))
    schema = dataclasses.make_dataclass(name, spec, bases=(base,) if base else ())
    schema.__module__ = __name__  # picklable by reference (joblib and submitit launchers)
    schema.__doc__ = f"Schema of {cls.__module__}.{cls.__qualname__} (its fields, no checks)."
    schema.target = cls
    return schema


EngineSchema = _schema_of(EngineConfig, "EngineSchema")
WorkloadSchema = _schema_of(WorkloadConfig, "WorkloadSchema")
SLOSchema = _schema_of(SLO, "SLOSchema")
RewardSchema = _schema_of(RewardConfig, "RewardSchema")
BackendSchema = _schema_of(BackendConfig, "BackendSchema")

SECTIONS = {"engine": EngineSchema, "workload": WorkloadSchema, "slo": SLOSchema,
            "reward": RewardSchema, "backend": BackendSchema}


# Where lpenv-train publishes its exported policy and where `policy=learned` (and `make run`)
# looks for it: a folder with policy.json (policies/export.py).
LEARNED_POLICY_PATH = "results/learned/policy"


# ---- policies: one schema each; ``name`` is the registry name, the rest its parameters ------
@dataclass
class PolicyConfig:
    name: str = MISSING
    # Legend label in reports; default: the name plus any ``policy.*`` command-line overrides.
    label: str | None = None


def _policy_schema(cls: type, name: str) -> type:
    """A policy's parameters are its dataclass fields: one definition, here and there."""
    schema_name = "".join(part.title() for part in name.split("_")) + "PolicySchema"
    return _schema_of(cls, schema_name, skip=("mode", "context"), base=PolicyConfig,
                      defaults={"name": name})


# Module names equal the class names: the launchers pickle schemas by reference.
FixedPolicySchema = _policy_schema(FixedGroups, "fixed")
PaperPolicySchema = _policy_schema(PaperRule, "paper")
SloAwarePolicySchema = _policy_schema(SloAware, "slo_aware")
ChunkedPolicySchema = _policy_schema(ChunkedPrefill, "chunked")
RandomPolicySchema = _policy_schema(RandomPolicy, "random")


@dataclass
class LearnedPolicySchema(PolicyConfig):
    name: str = "learned"
    path: str = LEARNED_POLICY_PATH


POLICY_SCHEMAS = {"fixed": FixedPolicySchema, "paper": PaperPolicySchema,
                  "slo_aware": SloAwarePolicySchema, "chunked": ChunkedPolicySchema,
                  "random": RandomPolicySchema, "learned": LearnedPolicySchema}


# ---- the top-level configs -----------------------------------------------------------------
@dataclass
class Sections:
    """The sections every command shares (see ``SECTIONS``)."""

    engine: EngineSchema = field(default_factory=EngineSchema)
    workload: WorkloadSchema = field(default_factory=WorkloadSchema)
    slo: SLOSchema = field(default_factory=SLOSchema)
    reward: RewardSchema = field(default_factory=RewardSchema)
    backend: BackendSchema = field(default_factory=BackendSchema)


@dataclass
class EvalConfig(Sections):
    """``lpenv-eval``: one policy on one workload."""

    policy: PolicyConfig = MISSING
    seed: int = 0  # the workload's arrivals, lengths and token ids
    horizon_s: float | None = None  # stop the virtual clock here (unfinished requests miss)
    warmup: bool = True  # one small request first, so one-time costs miss the measurement
    progress: bool = True  # a tqdm bar per run


@dataclass
class EnvOptions:
    """The env's other arguments (``LayeredPrefillEnv.__init__``)."""

    group_choices: list[int] | None = None
    admission_levels: int = 4
    allow_stagger: bool = True
    queue_slots: int = 8
    horizon_s: float | None = None
    max_decisions: int | None = None
    rate_scale: float | None = None
    energy_scale: float = 0.01


@dataclass
class ServeConfig(Sections):
    """``lpenv-serve``: one policy on the real engine, behind an OpenAI-compatible API."""

    policy: PolicyConfig = MISSING
    host: str = "127.0.0.1"  # 0.0.0.0 exposes the server to the network: say so explicitly
    port: int = 8000
    tokenizer: str | None = None  # a folder with tokenizer.json; null: prompt bytes are tokens
    served_model_name: str | None = None  # what clients name as "model"; null: engine.model
    warmup: bool = True  # one small request first, so one-time costs miss the first client


ALGOS = ("maskable_ppo", "ppo")


@dataclass
class TrainSection:
    """``policies.sb3.train_policy``'s arguments besides the env's."""

    algo: str = "maskable_ppo"  # maskable_ppo | ppo
    total_timesteps: int = 20_000
    n_envs: int = 1
    eval_episodes: int = 2
    eval_freq: int | None = 2048  # env steps between evaluations; null: only at the end
    keep_best: bool = True  # export the actor that evaluated best, not the last one
    imitate: str | None = None  # a hand-written policy cloned before RL (paper); null: none
    imitate_episodes: int = 30  # its demonstration episodes
    imitate_epochs: int = 60  # passes over its decisions
    checkpoint_freq: int | None = None  # env steps between checkpoints; null: 4 per run
    progress_bar: bool = True
    tensorboard: bool = True
    invalid_penalty: float = 0.05  # ppo: reward of an action the mask forbids (refused)
    hyperparams: dict[str, Any] = field(default_factory=dict)  # over sb3's DEFAULT_HYPERPARAMS
    out_dir: str | None = None  # default: the Hydra run directory
    export_path: str | None = LEARNED_POLICY_PATH  # the exported policy is copied here


@dataclass
class TrainConfig(Sections):
    """``lpenv-train``: PPO or MaskablePPO on the env."""

    env: EnvOptions = field(default_factory=EnvOptions)
    train: TrainSection = field(default_factory=TrainSection)
    seed: int = 0


def register_configs() -> None:
    """Put the schemas into Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="serve_schema", node=ServeConfig)
    for name, schema in POLICY_SCHEMAS.items():
        # Under schema/policy, not policy/, so `policy=` offers only the real options.
        cs.store(group="schema/policy", name=name, node=schema, package="policy")


# ---- from a composed config to the consumers' objects --------------------------------------
def to_dataclass(section: str, node: DictConfig | dict) -> Any:
    """The real dataclass of ``section`` (its ``__post_init__`` checks run here)."""
    values = node
    if isinstance(node, DictConfig):
        values = OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    # Unknown keys are only reachable by adding them (`+engine.x=1`): the schema stops the rest.
    return build_section(SECTIONS[section].target, values, section)


def check_top_level(cfg: DictConfig, schema: type) -> None:
    """Refuse a top-level key the schema does not have: only reachable by adding it (``+x=1``,
    e.g. ``+horizon=1`` for ``horizon_s``), and then silently ignored."""
    known = {f.name for f in dataclasses.fields(schema)}
    unknown = sorted(k for k in cfg if k not in known and k != "hydra")
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}: nothing reads them; known: "
                         f"{', '.join(sorted(known))}")


def policy_params(node: DictConfig) -> dict[str, Any]:
    """The policy's constructor parameters: the section without ``name`` and ``label``."""
    values = OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    return {k: v for k, v in values.items() if k not in ("name", "label")}


def env_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """``gymnasium.make("lpenv/LayeredPrefill-v1", **env_kwargs(cfg))``: plain mappings."""
    out = {name: OmegaConf.to_container(cfg[name], resolve=True, throw_on_missing=True)
           for name in SECTIONS}
    out.update(OmegaConf.to_container(cfg.env, resolve=True, throw_on_missing=True))
    return out
