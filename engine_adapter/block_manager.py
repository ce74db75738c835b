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
        # LIFO free list: recently freed blocks are reused first (warm in cache). Blocks never
        # handed out are not listed: they come after it, lowest first (``_fresh`` the next),
        # so a large cache costs nothing to make (the env makes one every episode).
        self._free: list[int] = []
        self._fresh = 0

    @property
    def num_free(self) -> int:
        return len(self._free) + self.num_blocks - self._fresh

    def _take(self, n: int) -> list[int]:
        """The next ``n`` free blocks (there must be as many), in the order they go out."""
        free = self._free
        k = min(n, len(free))
        taken = free[len(free) - k:]
        taken.reverse()
        del free[len(free) - k:]
        if n > k:
            taken += range(self._fresh, self._fresh + n - k)
            self._fresh += n - k
        return taken

    def blocks_needed(self, request: Request, upto_tokens: int) -> int:
        """Blocks ``request`` must add to hold KV for its first ``upto_tokens`` tokens."""
        need = -(-upto_tokens // self.block_size)
        return max(0, need - len(request.block_table))

    def can_grow(self, request: Request, upto_tokens: int) -> bool:
        return self.blocks_needed(request, upto_tokens) <= self.num_free

    def grow(self, request: Request, upto_tokens: int) -> None:
        need = self.blocks_needed(request, upto_tokens)
        if need > self.num_free:
            raise RuntimeError(f"out of KV blocks: need {need}, {self.num_free} free")
        if need:
            request.block_table += self._take(need)

    def add_one(self, requests: Sequence[Request]) -> None:
        """One more block to each of ``requests``, in this order (a request listed twice gets
        two): a run of decode iterations growing many tables at once."""
        if len(requests) > self.num_free:
            raise RuntimeError(f"out of KV blocks: need {len(requests)}, {self.num_free} free")
        for request, block in zip(requests, self._take(len(requests))):
            request.block_table.append(block)

    def free(self, request: Request) -> None:
        self._free.extend(reversed(request.block_table))
        request.block_table = []

    def slot(self, request: Request, position: int) -> int:
        return request.block_table[position // self.block_size] * self.block_size + (
            position % self.block_size)
