"""A test executor that checks the KV cache's integrity instead of computing.

Each layer's cache is a map slot -> (request, position). Every row writes its slot in every
layer it passes and must find its whole context there: a leaked, shared or overwritten block,
a row run in a layer twice or not at all shows up as an assertion error. Tokens are a fixed
function of (request, position), so outputs do not depend on the schedule.
"""

from __future__ import annotations

from engine_adapter.plan import ExecutionResult, IterationPlan, Segment


def token_for(request_id: str, position: int, vocab: int) -> int:
    return (hash((request_id, position)) & 0x7FFFFFFF) % vocab


class CheckingExecutor:
    def __init__(self, num_layers: int, block_size: int, vocab: int) -> None:
        self.block_size = block_size
        self.vocab = vocab
        self.cache: list[dict[int, tuple[str, int]]] = [{} for _ in range(num_layers)]
        self.in_flight: dict[int, int] = {}  # batch id -> next layer it must run
        self.plans: list[IterationPlan] = []

    def _slot(self, seg: Segment, pos: int) -> int:
        return seg.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _run_segment(self, seg: Segment, layer: int) -> None:
        cache = self.cache[layer]
        for pos in range(seg.start, seg.end):
            cache[self._slot(seg, pos)] = (seg.request_id, pos)
        for pos in range(seg.end):
            found = cache.get(self._slot(seg, pos))
            assert found == (seg.request_id, pos), (
                f"layer {layer}: request {seg.request_id} expected its KV of position {pos}, "
                f"found {found}")

    def execute(self, plan: IterationPlan) -> ExecutionResult:
        self.plans.append(plan)
        for b in plan.cancelled_batches:
            self.in_flight.pop(b, None)
        for st in plan.stages:
            expected = 0 if st.is_first else self.in_flight.get(st.batch_id)
            assert st.layer_start == expected, f"batch {st.batch_id} skipped or repeated layers"
            self.in_flight[st.batch_id] = st.layer_end
            if st.is_last:
                assert st.layer_end == plan.num_layers
                del self.in_flight[st.batch_id]
        sampled = {}
        for layer in range(plan.num_layers):
            for seg in plan.decode:
                self._run_segment(seg, layer)
            for st in plan.stages:
                if st.covers(layer):
                    for seg in st.segments:
                        self._run_segment(seg, layer)
        for seg in plan.decode:
            sampled[seg.request_id] = token_for(seg.request_id, seg.end, self.vocab)
        for st in plan.stages:
            if st.is_last:
                for seg in st.segments:
                    if seg.sample:
                        sampled[seg.request_id] = token_for(seg.request_id, seg.end, self.vocab)
        return ExecutionResult(1e-3, sampled, [None] * plan.num_layers)
