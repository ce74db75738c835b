"""The engine's greedy tokens and the logits each came from: what the reference tests
compare with another implementation's (transformers', vLLM's)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine_adapter.engine import Engine


def greedy_outputs(engine: Engine, prompts: Sequence[Sequence[int]], max_tokens: int
                   ) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Queue ``prompts`` together, run ``engine`` to the end; per prompt, its tokens and the
    logits of each (one row a token)."""
    engine.executor.capture_logits = True
    ids = [engine.add_request(list(p), max_tokens) for p in prompts]
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    logits: dict[str, list[torch.Tensor]] = {rid: [] for rid in ids}
    for report in engine.run():
        for ev in report.events:
            tokens[ev.request_id].append(ev.token_id)
            logits[ev.request_id].append(report.logits[ev.request_id])
    return [tokens[r] for r in ids], [torch.stack(logits[r]) for r in ids]
