"""Replaying recorded plans side by side (``engine_adapter.replay``)."""

import numpy as np
import pytest

from engine_adapter.plan import ExecutionResult, IterationPlan, Segment, StageWork
from engine_adapter.replay import replay, replayable, with_data


def plan(iteration: int, stage: int = 0, groups: int = 1, decode: int = 2) -> IterationPlan:
    """Shapes as a record keeps them: no block tables, no token ids."""
    dec = tuple(Segment(f"d{i}", 40 + 17 * i, 1, (), True) for i in range(decode))
    segs = (Segment("a", 0, 37, (), False), Segment("b", 16, 5, (), True))
    return IterationPlan(iteration, "layered", 4, dec,
                         (StageWork(7, stage, groups, 0, 4 // groups, segs),))


class Recorder:
    """Stands in for the torch executor: keeps what it ran and when it was reset."""

    def __init__(self) -> None:
        self.ran: list[IterationPlan] = []
        self.resets = 0

    def execute(self, p: IterationPlan) -> ExecutionResult:
        self.ran.append(p)
        return ExecutionResult(float(len(self.ran)), {}, [[1, 0, 2], None, [0, 0, 1], None])

    def reset(self) -> None:
        self.resets += 1


def test_with_data_gives_each_request_blocks_of_its_own_and_token_ids():
    shape = plan(3)
    p = with_data(shape, block_size=16, num_blocks=64, vocab=50, rng=np.random.default_rng(0))
    segments = [*p.decode, *p.stages[0].segments]
    blocks = [b for s in segments for b in s.block_table]
    assert len(blocks) == len(set(blocks)) and max(blocks) < 64  # none shared, all there
    for s, bare in zip(segments, [*shape.decode, *shape.stages[0].segments]):
        assert len(s.block_table) * 16 >= s.end > (len(s.block_table) - 1) * 16
        assert len(s.token_ids) == s.length and all(0 <= t < 50 for t in s.token_ids)
        assert s._replace(block_table=(), token_ids=None) == bare  # the shape is kept
    assert p._replace(decode=shape.decode, stages=shape.stages) == shape


def test_with_data_refuses_a_plan_the_cache_cannot_hold():
    with pytest.raises(ValueError, match="more than the executor's 3 KV blocks"):
        with_data(plan(0), block_size=16, num_blocks=3, vocab=50, rng=np.random.default_rng(0))


def test_replay_runs_every_plan_once_mixed_and_keeps_each_sets_order():
    sets = {"grid": [plan(i) for i in range(30)], "held": [plan(100 + i) for i in range(30)]}
    ex = Recorder()
    out = replay(ex, sets, block_size=16, num_blocks=64, vocab=50, seed=1)
    assert sorted(p.iteration for p in ex.ran) == [*range(30), *range(100, 130)]
    assert ex.resets == 60  # nothing carried from one replayed plan to the next
    for label, plans in sets.items():
        assert [s.plan for s in out[label]] == plans  # the recorded shapes, in their order
        assert [s.distinct_experts for s in out[label]] == [(2, None, 1, None)] * 30
    # One random order: each set's plans spread over the whole replay, not one set first.
    held_at = [i for i, p in enumerate(ex.ran) if p.iteration >= 100]
    assert np.mean(held_at) == pytest.approx(29.5, abs=8)
    assert held_at != list(range(30, 60)) and held_at != list(range(30))
    # Each sample's latency is the one measured when its plan ran.
    position = {p.iteration: i for i, p in enumerate(ex.ran)}
    assert all(s.measured_s == position[s.plan.iteration] + 1 for s in out["held"])


def test_replay_refuses_a_stage_that_continues_a_batch():
    assert replayable(plan(0)) and not replayable(plan(1, stage=1, groups=2))
    with pytest.raises(ValueError, match=r"held: iterations \[1\] continue a batch"):
        replay(Recorder(), {"held": [plan(0), plan(1, stage=1, groups=2)]}, 16, 64, 50)
