"""The chunked-prefill baseline (Sarathi-Serve, vLLM's default): the engine in chunked mode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from engine_adapter.decision import Decision, SchedulerView
from engine_adapter.errors import is_count
from policies.protocol import check_setting


@dataclass
class ChunkedPrefill:
    """Each iteration's ``chunk_tokens`` go to decode tokens first, then the continuing chunk,
    then new requests. The engine does this itself in chunked mode: ``decide`` is never called."""

    chunk_tokens: int = 512
    name: str = "chunked"
    mode: str = "chunked"
    # As conf/policy/chunked.yaml: ``chunk_tokens: ${engine.chunk_tokens}`` where an engine is
    # known (lpenv-export's env config too).
    engine_defaults: ClassVar[dict[str, str]] = {"chunk_tokens": "chunk_tokens"}

    def __post_init__(self) -> None:
        check_setting(self.name, "chunk_tokens", self.chunk_tokens,
                      is_count(self.chunk_tokens), "a positive integer")

    def decide(self, view: SchedulerView) -> Decision:
        raise RuntimeError("the chunked baseline runs the engine in chunked mode, which admits "
                           "requests itself; it has no decisions to make")

    __call__ = decide
