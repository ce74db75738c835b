"""A request and its lifecycle."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from mypy_extensions import mypyc_attr


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued; may hold KV of earlier prompt pieces
    PREFILLING = "prefilling"  # a member of an in-flight prefill batch
    DECODING = "decoding"
    FINISHED = "finished"
    ABORTED = "aborted"


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # (compiled: copied with the env)
@dataclass
class Request:
    """One generation request.

    The request's known tokens are its prompt plus what it generated so far; KV exists for the
    first ``num_computed`` of them. Prefill computes the rest and samples the next token, which
    also makes recompute after preemption the same code path as a first prefill.
    """

    request_id: str
    prompt_token_ids: list[int] | None  # None: known by its length only (the simulator)
    max_tokens: int
    arrival_time: float = 0.0
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    # Where the request is now, for reports and views: (batch id, piece) while prefilling.
    batch_id: int | None = None
    prompt_len: int = 0  # set from the ids when they are given

    def __post_init__(self) -> None:
        if self.prompt_token_ids is not None:
            self.prompt_len = len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status in (RequestStatus.FINISHED, RequestStatus.ABORTED)

    def _prompt(self) -> list[int]:
        if self.prompt_token_ids is None:
            raise ValueError(f"request {self.request_id!r} has no token ids (the simulator's)")
        return self.prompt_token_ids

    def token_at(self, position: int) -> int:
        p = self.prompt_len
        if position < p:
            return self._prompt()[position]
        return self.output_token_ids[position - p]

    def tokens(self, start: int, stop: int) -> list[int]:
        all_ids = self._prompt() + self.output_token_ids
        return all_ids[start:stop]
