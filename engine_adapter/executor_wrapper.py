"""An executor around another: what it does not define itself, the inner one answers."""

from __future__ import annotations

from typing import Any


class ExecutorWrapper:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.device = getattr(inner, "device", None)

    def __getattr__(self, name: str):
        # Only for names not found on the wrapper. ``inner`` itself is missing while pickle or
        # copy rebuild the object (before its __dict__ is back): no recursion then.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
