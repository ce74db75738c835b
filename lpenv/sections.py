"""Config sections (engine, workload, slo, reward, backend) into their dataclasses: one rule
for the env's keyword arguments and for Hydra configs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, fields
from typing import Any, TypeVar

T = TypeVar("T")


def build_section(cls: type[T], value: Any, name: str,
                  defaults: Mapping[str, Any] | None = None) -> T:
    """``cls`` from itself, a mapping, or None (its defaults); a mapping's keys go over
    ``defaults`` where given (a caller's defaults that differ from the dataclass's: a partial
    section keeps the rest of them). An unknown key, or a missing one that has no default, is
    an error that names it and lists the keys ``cls`` takes. The dataclass's own checks run as
    it is built."""
    if isinstance(value, cls):
        return value
    if defaults is not None and (value is None or isinstance(value, Mapping)):
        value = {**defaults, **(value or {})}
    if value is None:
        return cls()
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a {cls.__name__} or a mapping, "
                        f"got {type(value).__name__}")
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
                         f"{name} takes: {', '.join(sorted(known))}")
    missing = [f.name for f in fields(cls) if f.init and f.name not in value
               and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ValueError(f"{', '.join(f'{name}.{k}' for k in missing)} must be given (no "
                         f"default); {name} takes: {', '.join(sorted(known))}")
    return cls(**dict(value))
