"""The action encoding: ``MultiDiscrete([len(group_choices), admission_levels, 2])``.

* component 0, **G**: index into ``group_choices`` (default: for each distinct largest group
  size ceil(L / G), the smallest G that gives it; for 48 layers 1, 2, 3, 4, 5, 6, 7, 8, 10,
  12, 16, 24, 48);
* component 1, **admission**: level i admits the first-come-first-served prefix of the queue
  whose requests start within the batch's first ``(i + 1) / levels`` of the prefill budget,
  each with as much of its prompt as the whole budget allows (the top level: the engine's
  FCFS fill, the last request a piece if need be), as far as the free KV blocks and
  ``max_num_seqs`` hold them (``SchedulerView.level_admission``). Lower levels
  admit fewer requests, each as the top level would; every level admits at least the queue's
  head, so they are allowed or not together;
* component 2, **start**: 0 waits (no batch starts this iteration: lets the queue build up,
  or lets a batch in flight finish), 1 starts the batch now, even while others are in flight.

Masks (for ``MaskablePPO``) are the three components' masks concatenated. An action the mask
forbids raises ``InvalidAction``; it is never changed into another.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from mypy_extensions import mypyc_attr

from engine_adapter.decision import Decision, SchedulerView
from engine_adapter.errors import InvalidDecision, is_count

WAIT, START = 0, 1


@mypyc_attr(native_class=False)  # (compiled: as the errors it extends)
class InvalidAction(InvalidDecision):
    """An action outside the space or forbidden by the current mask."""


def default_group_choices(num_layers: int) -> tuple[int, ...]:
    choices: dict[int, int] = {}
    for g in range(1, num_layers + 1):
        choices.setdefault(math.ceil(num_layers / g), g)
    return tuple(sorted(choices.values()))


@mypyc_attr(native_class=False)  # (compiled: made of what users pass, checked here)
@dataclass(frozen=True)
class ActionCodec:
    group_choices: tuple[int, ...]
    admission_levels: int = 4
    allow_stagger: bool = True
    # The last mask computed, by view identity: the env asks for it several times per step
    # (decision point, decode, action_masks, info) and views are immutable.
    _memo: list = field(default_factory=list, init=False, repr=False, compare=False)
    # The masks there can be (only whether it may wait and may start varies), made once.
    _made: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        raw: Any = self  # (untyped until checked)
        if not raw.group_choices or not all(is_count(g) for g in raw.group_choices):
            raise ValueError(f"group_choices must be positive integers, got {raw.group_choices}")
        if not is_count(raw.admission_levels):
            raise ValueError(f"admission_levels must be a positive integer, got "
                             f"{raw.admission_levels!r}")
        # numpy's integers (np.arange) as Python's: what decisions and JSON carry
        object.__setattr__(self, "group_choices", tuple(int(g) for g in raw.group_choices))
        object.__setattr__(self, "admission_levels", int(raw.admission_levels))

    @classmethod
    def for_layers(cls, num_layers: int, group_choices: Any = None,
                   admission_levels: Any = 4, allow_stagger: Any = True) -> ActionCodec:
        if group_choices is not None and not len(group_choices):
            raise ValueError("group_choices must list at least one G (None: the default "
                             "choices)")
        choices = (tuple(group_choices) if group_choices is not None
                   else default_group_choices(num_layers))
        codec = cls(choices, admission_levels, bool(allow_stagger))
        too_big = [g for g in codec.group_choices if g > num_layers]
        if too_big:
            raise ValueError(f"group_choices {too_big} exceed the model's {num_layers} layers")
        return codec

    @property
    def nvec(self) -> list[int]:
        return [len(self.group_choices), self.admission_levels, 2]

    def masks(self, view: SchedulerView | None, can_wait: bool = True) -> np.ndarray:
        """Flat boolean mask over the three components (``sum(nvec)`` entries)."""
        return self._mask(view, can_wait).copy()

    def _mask(self, view: SchedulerView | None, can_wait: bool) -> np.ndarray:
        """``masks``, shared: the caller must not change it."""
        memo = self._memo
        if memo and memo[0] is view and memo[1] == can_wait:
            return memo[2]
        mask = self._masks(view, can_wait)
        memo[:] = (view, can_wait, mask)
        return mask

    def _masks(self, view: SchedulerView | None, can_wait: bool) -> np.ndarray:
        # Every level admits the head first, with as many tokens: all levels or none.
        can_start = view is not None and view.admits_any() and (
            self.allow_stagger or not view.in_flight)
        # (levels are ignored when waiting: the mask keeps them all allowed then)
        key = (can_wait or not can_start, can_start)
        mask = self._made.get(key)
        if mask is None:
            mask = self._made[key] = np.array(
                [True] * (len(self.group_choices) + self.admission_levels) + list(key))
            mask.flags.writeable = False  # (shared by every step that has it)
        return mask

    def is_decision_point(self, view: SchedulerView | None) -> bool:
        return view is not None and bool(self._mask(view, True)[-1])

    def decode(self, action: Sequence[int], view: SchedulerView, can_wait: bool = True) -> Decision:
        if type(action) is list and all(type(x) is int for x in action):
            values = action  # (the common case from Python: no array to make)
        else:
            a = np.asarray(action).reshape(-1)
            values = a.tolist()
            if a.dtype.kind == "f" and np.array_equal(a, np.trunc(a)):
                values = [int(x) for x in values]  # whole numbers as floats, e.g. from a list
        nvec = self.nvec
        if len(values) != 3 or not all(
                type(x) is int and 0 <= x < n for x, n in zip(values, nvec)):
            raise InvalidAction(f"action {values} is outside MultiDiscrete({nvec})")
        mask = self._mask(view, can_wait)
        masked = self.masked_components(values, mask)
        if masked:
            component = masked[0]
            raise InvalidAction(
                f"action {values}: component {component} value {values[component]} is masked "
                f"out here (mask {mask.astype(int).tolist()})")
        g_idx, level, start = values
        if start == WAIT:
            return Decision.wait()
        return Decision(min(self.group_choices[g_idx], view.num_layers),
                        view.level_admission(level, self.admission_levels))

    def masked_components(self, action: Sequence[int] | np.ndarray, mask: np.ndarray
                          ) -> list[int]:
        """The components of ``action`` (in range) that the flat ``mask`` (``masks``) forbids."""
        bad, off = [], 0
        for component, (x, n) in enumerate(zip(action, self.nvec)):
            if not mask[off + int(x)]:
                bad.append(component)
            off += n
        return bad

    def encode(self, decision: Decision, view: SchedulerView, round_groups: bool = False
               ) -> list[int]:
        """The action that ``decode`` turns into ``decision`` at ``view`` (what a policy's
        decision is in this action space, e.g. to imitate it): waiting is ``[0, top level,
        0]``; a start is its G's index and the lowest admission level that admits exactly its
        requests. An InvalidAction where no action means it (a G not among
        ``group_choices``, an admission no level makes, a budget below the engine's); with
        ``round_groups``, a G not among them becomes the choice whose largest layer group is
        nearest its own (the default choices hold one G per largest group: the paper rule's
        G = 4 on 5 layers, groups of 2, 1, 1, 1, becomes G = 3, groups of 2, 2, 1)."""
        if not decision.admit:
            return [0, self.admission_levels - 1, WAIT]
        layers = view.num_layers
        choices = [min(c, layers) for c in self.group_choices]
        g = choices.index(decision.num_groups) if decision.num_groups in choices else None
        if g is None and round_groups:
            largest = math.ceil(layers / decision.num_groups)
            gaps = [abs(math.ceil(layers / c) - largest) for c in choices]
            g = gaps.index(min(gaps))
        if g is None:
            raise InvalidAction(f"G = {decision.num_groups} is not among the action's "
                                f"group_choices {list(self.group_choices)}")
        if decision.budget is not None and decision.budget < view.prefill_budget:
            raise InvalidAction(f"a {decision.budget}-token budget: the action's levels all "
                                f"fill the engine's {view.prefill_budget}")
        admit = decision.admit
        for level in range(self.admission_levels):
            if view.level_admission(level, self.admission_levels) == admit:
                return [g, level, START]
        raise InvalidAction(f"admitting {list(admit)} is none of the "
                            f"{self.admission_levels} admission levels (FCFS prefixes of the "
                            "queue)")

    def to_json(self) -> dict:
        return {"group_choices": list(self.group_choices),
                "admission_levels": self.admission_levels, "allow_stagger": self.allow_stagger}
