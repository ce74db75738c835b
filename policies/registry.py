"""Policies by name, for configs and command lines."""

from __future__ import annotations

from typing import Any

from policies.chunked import ChunkedPrefill
from policies.fixed import FixedGroups
from policies.paper_rule import PaperRule
from policies.protocol import Policy, PolicyContext
from policies.random_policy import RandomPolicy
from policies.slo_aware import SloAware

POLICIES = ("fixed", "paper", "slo_aware", "chunked", "random", "learned")


def make_policy(name: str, context: PolicyContext, **params: Any) -> Policy:
    """A policy by name; unknown names and parameters are errors that list the known ones."""
    builders = {
        "fixed": lambda: FixedGroups(**params),
        "paper": lambda: PaperRule(**params),
        "slo_aware": lambda: SloAware(context, **params),
        "chunked": lambda: ChunkedPrefill(**params),
        "random": lambda: RandomPolicy(**params),
        "learned": lambda: _learned(context, **params),
    }
    if name not in builders:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    try:
        policy = builders[name]()
    except TypeError as exc:
        raise ValueError(f"bad parameters for policy {name!r}: {exc}") from None
    layers = context.model.num_layers
    if name == "fixed" and policy.groups > layers:  # (capped, it would run as G = layers)
        raise ValueError(f"policy fixed: groups={policy.groups} exceeds {context.model.name}'s "
                         f"{layers} layers (at most one layer a group: groups <= {layers})")
    return policy


def _learned(context: PolicyContext, path: str) -> Policy:
    from policies.export import load_policy  # the serving path: no training stack needed

    # Held to where it runs: what the policy reads (a learned policy's observation spec, the
    # SLO-aware heuristic's SLOs, every policy's layers) must match, fields named both ways.
    return load_policy(path, expect={"context": context, "engine": context.engine})
