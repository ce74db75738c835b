"""Exceptions the engine raises for bad input. Each names the problem it found; and the
one check of a count (a positive integer) that settings across the project share."""

from numbers import Integral

from mypy_extensions import mypyc_attr


def is_count(value: object) -> bool:
    """A positive integer (numpy's too), not a bool (``True`` is an int to Python, never a
    count here)."""
    if type(value) is int:  # (the common case, without the ABC check)
        return value >= 1
    return isinstance(value, Integral) and not isinstance(value, bool) and int(value) >= 1


@mypyc_attr(native_class=False)  # (compiled: users catch, subclass and pickle these)
class EngineError(Exception):
    """Base class for every error the engine raises on purpose."""


@mypyc_attr(native_class=False)
class ConfigError(EngineError, ValueError):
    """A model or engine configuration that cannot be built."""


@mypyc_attr(native_class=False)
class WeightsError(EngineError, ValueError):
    """Weights that do not match the model configuration."""


@mypyc_attr(native_class=False)
class RequestError(EngineError, ValueError):
    """A request the engine cannot serve (bad prompt, bad length, bad token ids)."""


@mypyc_attr(native_class=False)
class InvalidDecision(EngineError, ValueError):
    """A policy decision the scheduler cannot carry out (bad G or bad admission)."""
