"""Recorded iterations run again on the real engine's executor, several sets side by side.

A calibration record keeps each iteration's plan by its shape alone; timing needs no more.
``with_data`` gives a plan block tables and token ids again, and ``replay`` runs the plans of
several sets (a held-out run's and the grid's, say) in one random order, so that every set
meets the same machine. On a machine whose speed moves from one minute to the next, that
tells a shape the cost model misprices (the sets' speeds differ side by side) from a minute
the machine ran slow (they agree side by side, though not as recorded).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from engine_adapter.calibration import Sample
from engine_adapter.plan import IterationPlan, Segment


def replayable(plan: IterationPlan) -> bool:
    """Whether ``plan`` runs from nothing but its shape: every stage is its batch's first
    (a later stage takes the hidden state its batch's earlier iterations carried)."""
    return all(st.is_first for st in plan.stages)


def with_data(plan: IterationPlan, block_size: int, num_blocks: int, vocab: int,
              rng: np.random.Generator) -> IterationPlan:
    """``plan`` with block tables (each request its own blocks, from block 0 on) and random
    token ids: what the executor needs to run it. Values do not enter its timing, except
    through which experts the routers pick (the replay's own, as its samples record)."""
    tables: dict[str, tuple[int, ...]] = {}
    used = 0

    def filled(seg: Segment) -> Segment:
        nonlocal used
        if seg.request_id in tables:
            raise ValueError(f"request {seg.request_id!r} appears twice in iteration "
                             f"{plan.iteration}: not a plan the scheduler makes")
        need = -(-seg.end // block_size)
        if used + need > num_blocks:
            raise ValueError(f"iteration {plan.iteration} needs more than the executor's "
                             f"{num_blocks} KV blocks of {block_size} tokens")
        tables[seg.request_id] = table = tuple(range(used, used + need))
        used += need
        return seg._replace(block_table=table,
                            token_ids=tuple(rng.integers(0, vocab, seg.length).tolist()))

    return plan._replace(
        decode=tuple(filled(s) for s in plan.decode),
        stages=tuple(st._replace(segments=tuple(filled(s) for s in st.segments))
                     for st in plan.stages))


def replay(executor, sets: Mapping[str, Sequence[IterationPlan]], block_size: int,
           num_blocks: int, vocab: int, seed: int = 0,
           on_plan: Callable[[], None] | None = None) -> dict[str, list[Sample]]:
    """Run every set's plans on ``executor`` in one random order (seeded); per set, a sample
    per plan in the set's own order: the plan, the routers' distinct experts and the latency
    measured now."""
    for label, plans in sets.items():
        bad = [p.iteration for p in plans if not replayable(p)]
        if bad:
            raise ValueError(f"{label}: iterations {bad[:5]} continue a batch from an earlier "
                             f"iteration; only plans whose stages are all first ones replay")
    rng = np.random.default_rng(seed)
    order = [(label, i) for label, plans in sets.items() for i in range(len(plans))]
    measured: dict[tuple[str, int], Sample] = {}
    for k in rng.permutation(len(order)):
        label, i = order[k]
        plan = sets[label][i]
        result = executor.execute(with_data(plan, block_size, num_blocks, vocab, rng))
        executor.reset()  # (a first stage that is not its batch's last carried its rows on)
        measured[label, i] = Sample(plan, tuple(result.distinct_experts), result.latency_s)
        if on_plan:
            on_plan()
    return {label: [measured[label, i] for i in range(len(plans))]
            for label, plans in sets.items()}
