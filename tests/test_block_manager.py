"""The KV block manager hands out blocks in one order: the most recently freed first, then
those never handed out, lowest first, as a stack holding every block from the start would.
(It lists only the freed ones: the env makes a manager every episode.)"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_adapter.block_manager import BlockManager
from engine_adapter.request import Request


class Stack:
    """Every block listed from the start, the next on top: the order to keep."""

    def __init__(self, num_blocks: int) -> None:
        self.free = list(range(num_blocks - 1, -1, -1))

    def take(self, n: int) -> list[int]:
        return [self.free.pop() for _ in range(n)]


OPS = st.lists(st.tuples(st.sampled_from(["grow", "add_one", "free"]), st.integers(0, 5),
                         st.integers(1, 40)), max_size=60)


@settings(max_examples=60, deadline=None)
@given(num_blocks=st.integers(1, 24), ops=OPS)
def test_blocks_go_out_in_the_order_of_one_stack_of_them_all(num_blocks, ops):
    blocks, stack = BlockManager(num_blocks, 4), Stack(num_blocks)
    requests = [Request(str(i), None, 8, 0.0, prompt_len=1) for i in range(6)]
    tables: dict[str, list[int]] = {r.request_id: [] for r in requests}
    for op, i, tokens in ops:
        r = requests[i]
        if op == "free":
            blocks.free(r)
            stack.free.extend(reversed(tables[r.request_id]))
            tables[r.request_id] = []
        elif op == "grow":
            need = blocks.blocks_needed(r, tokens)
            if need > len(stack.free):
                with pytest.raises(RuntimeError, match="out of KV blocks"):
                    blocks.grow(r, tokens)
                continue
            blocks.grow(r, tokens)
            tables[r.request_id] += stack.take(need)
        else:  # one block to each of the first i + 1 requests
            some = requests[:i + 1]
            if len(some) > len(stack.free):
                with pytest.raises(RuntimeError, match="out of KV blocks"):
                    blocks.add_one(some)
                continue
            blocks.add_one(some)
            for s, block in zip(some, stack.take(len(some))):
                tables[s.request_id].append(block)
        assert {q.request_id: q.block_table for q in requests} == tables
        assert blocks.num_free == len(stack.free)
    for r in requests:
        blocks.free(r)
    assert blocks.num_free == num_blocks
