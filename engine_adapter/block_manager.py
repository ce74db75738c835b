"""Paged KV-cache bookkeeping: which cache blocks each request owns."""

from __future__ import annotations

from collections.abc import Sequence

from mypy_extensions import mypyc_attr

from engine_adapter.request import Request


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # (compiled: copied with the env)
class BlockManager:
    """Hands out fixed-size KV blocks; a block belongs to at most one request."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        # LIFO free list: recently freed blocks are reused first (warm in cache).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, request: Request, upto_tokens: int) -> int:
        """Blocks ``request`` must add to hold KV for its first ``upto_tokens`` tokens."""
        need = -(-upto_tokens // self.block_size)
        return max(0, need - len(request.block_table))

    def can_grow(self, request: Request, upto_tokens: int) -> bool:
        return self.blocks_needed(request, upto_tokens) <= len(self._free)

    def grow(self, request: Request, upto_tokens: int) -> None:
        need = self.blocks_needed(request, upto_tokens)
        if need > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {need}, {len(self._free)} free")
        if need:  # the blocks a pop() each would give, in that order
            request.block_table += reversed(self._free[-need:])
            del self._free[-need:]

    def add_one(self, requests: Sequence[Request]) -> None:
        """One more block to each of ``requests``, in this order (a request listed twice gets
        two): a run of decode iterations growing many tables at once."""
        if len(requests) > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {len(requests)}, {len(self._free)} free")
        for request in requests:
            request.block_table.append(self._free.pop())

    def free(self, request: Request) -> None:
        self._free.extend(reversed(request.block_table))
        request.block_table = []

    def slot(self, request: Request, position: int) -> int:
        return request.block_table[position // self.block_size] * self.block_size + (
            position % self.block_size)
