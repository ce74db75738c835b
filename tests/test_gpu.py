"""CUDA runs the same engine (plain PyTorch ops) with the CPU's results. Needs a GPU:
``pytest -m gpu``."""

from __future__ import annotations

import pytest
import torch

from engine_adapter.config import EngineConfig
from engine_adapter.engine import Engine
from policies.fixed import FixedGroups

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _tokens_and_logits(device: str):
    engine = Engine(EngineConfig(model="qwen3-moe-tiny", device=device, kv_cache_tokens=4096),
                    decide=FixedGroups(2, budget=64, staggered=True))
    engine.executor.capture_logits = True
    gen = torch.Generator().manual_seed(3)
    for n in (30, 70, 110):
        engine.add_request(torch.randint(0, 512, (n,), generator=gen).tolist(), 16)
    tokens, logits = {}, {}
    for report in engine.run():
        assert report.energy_source in ("measured:nvml", "modeled:h100-sxm", "modeled:cpu-generic")
        for ev in report.events:
            tokens.setdefault(ev.request_id, []).append(ev.token_id)
            logits.setdefault(ev.request_id, []).append(report.logits[ev.request_id])
    return tokens, {k: torch.stack(v) for k, v in logits.items()}


def test_cuda_matches_cpu():
    cpu_tokens, cpu_logits = _tokens_and_logits("cpu")
    gpu_tokens, gpu_logits = _tokens_and_logits("cuda")
    assert gpu_tokens == cpu_tokens
    for rid, ref in cpu_logits.items():
        assert (gpu_logits[rid] - ref).abs().max() / ref.abs().max() < 1e-3


def test_nvml_energy_fit_on_the_gpu():
    """On a GPU with NVML's counter: the energy loads run, each span covers whole steps of the
    counter, and the fitted constants predict each load's joules."""
    from engine_adapter.calibration import EnergyLoads, energy_spans, fit_energy
    from engine_adapter.energy_fit import energy_counter
    from engine_adapter.engine import build_model
    from engine_adapter.executor_torch import TorchExecutor
    from engine_adapter.model_config import ModelConfig

    counter = energy_counter("cuda")
    if counter is None:
        pytest.skip("NVML's energy counter is not readable (pip install -e .[gpu])")
    cfg = EngineConfig(model="qwen3-moe-tiny", device="cuda", kv_cache_tokens=65536)
    mc = ModelConfig.load(cfg.model)
    executor = TorchExecutor(build_model(cfg, mc), cfg.num_kv_blocks, cfg.block_size)
    spans = energy_spans(cfg, mc, executor, counter, EnergyLoads(seconds=1.0))
    assert all(s.seconds >= 1.0 and s.joules > 0 for s in spans)
    model, errors = fit_energy(spans, "h")
    assert model.static_w > 0 and float(errors.max()) < 0.2
