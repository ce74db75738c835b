"""The engine: requests in, iterations out. Drivable step by step by the env or a server."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from numbers import Real
from typing import Any

import numpy as np
from mypy_extensions import mypyc_attr

from engine_adapter.block_manager import BlockManager
from engine_adapter.clock import VirtualClock, WallClock
from engine_adapter.config import EngineConfig
from engine_adapter.decision import Decision, DecisionFunction, EngineStats, SchedulerView
from engine_adapter.energy import EnergyMeter, energy_meter
from engine_adapter.errors import ConfigError, RequestError, is_count
from engine_adapter.model import MoETransformer
from engine_adapter.model_config import ModelConfig
from engine_adapter.plan import IterationReport, RunReport, TokenEvent
from engine_adapter.request import Request
from engine_adapter.scheduler import Scheduler
from engine_adapter.traffic import plan_traffic
from engine_adapter.weights import dummy_weights, load_safetensors

# Weight of the newest sample in the engine's moving averages (latency, arrivals, energy).
STATS_SMOOTHING = 0.2


def build_model(config: EngineConfig, model_config: ModelConfig) -> MoETransformer:
    if not model_config.executable:
        raise ConfigError(
            f"{model_config.name} ({model_config.architecture}) runs on the sim backend only: "
            "the torch model implements Qwen3-MoE and Mixtral")
    device, dtype = config.present_device(), config.torch_dtype
    if config.weights == "dummy":
        weights = dummy_weights(model_config, dtype, device, seed=config.seed)
    else:
        weights = load_safetensors(model_config, config.weights, dtype, device)
    return MoETransformer(model_config, weights)


def max_model_len(config: EngineConfig, model_config: ModelConfig) -> int:
    """The longest request (prompt and output) the engine serves: ``config.max_model_len``
    (None: the model's), never beyond the model's positions. A ConfigError where the KV
    cache cannot hold one such request (checked wherever a configuration is read, before
    any engine is built)."""
    length = min(config.max_model_len or model_config.max_position_embeddings,
                 model_config.max_position_embeddings)
    capacity = config.num_kv_blocks * config.block_size
    if capacity < length:
        raise ConfigError(
            f"KV cache of {capacity} tokens cannot hold even one request of max_model_len "
            f"{length}: raise kv_cache_tokens or lower max_model_len")
    return length


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # (compiled: copied with the env)
class Engine:
    """Continuous batching over one scheduler and one executor.

    ``decide`` is the policy's decision function (needed in layered mode). ``executor``
    defaults to the torch executor on ``config.device``; ``clock`` to a virtual clock that
    advances by each iteration's measured latency.
    """

    def __init__(
        self,
        config: EngineConfig | None = None,
        decide: DecisionFunction | None = None,
        executor=None,
        clock: VirtualClock | WallClock | None = None,
        energy: EnergyMeter | None = None,
        model_config: ModelConfig | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.model_config = model_config or ModelConfig.load(self.config.model)
        cfg, mcfg = self.config, self.model_config
        self.max_model_len = max_model_len(cfg, mcfg)
        if executor is None:
            from engine_adapter.executor_torch import TorchExecutor

            executor = TorchExecutor(build_model(cfg, mcfg), cfg.num_kv_blocks, cfg.block_size)
        self.executor = executor
        self.clock = clock or VirtualClock()
        device_type = getattr(getattr(executor, "device", None), "type", "cpu")
        self.energy = energy or energy_meter(device_type)
        self.dtype_bytes = cfg.torch_dtype.itemsize
        self.blocks = BlockManager(cfg.num_kv_blocks, cfg.block_size)
        self.scheduler = Scheduler(cfg.mode, mcfg.num_layers, self.blocks, cfg.prefill_budget,
                                   cfg.chunk_tokens, cfg.max_num_seqs, decide,
                                   with_data=getattr(executor, "needs_data", True),
                                   max_in_flight=cfg.max_batches_in_flight)
        self._ids = itertools.count()
        self._last_arrival: float | None = None

    # ---- requests -------------------------------------------------------------------------
    @property
    def needs_token_ids(self) -> bool:
        """Whether prompts must be given as token ids (False on the simulator, which prices
        plans by their shapes: ``add_request_of_length`` will do)."""
        return getattr(self.executor, "needs_data", True)

    # (What callers pass is typed Any below: it is checked here, whatever it is.)
    def add_request(
        self,
        prompt_token_ids: Sequence[int],
        max_tokens: Any,
        request_id: Any = None,
        arrival_time: Any = None,
    ) -> str:
        """Queue a request; bad input raises RequestError and changes nothing."""
        ids = np.asarray(prompt_token_ids)
        if ids.size == 0:
            raise RequestError("empty prompt: a request needs at least one prompt token")
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise RequestError("the prompt must be a flat sequence of integer token ids")
        vocab = self.model_config.vocab_size
        bad = ids[(ids < 0) | (ids >= vocab)]
        if bad.size:
            raise RequestError(
                f"token ids outside the vocabulary [0, {vocab}): {bad[:5].tolist()}")
        return self._queue(ids.tolist(), len(ids), max_tokens, request_id, arrival_time)

    def add_request_of_length(
        self,
        prompt_len: Any,
        max_tokens: Any,
        request_id: Any = None,
        arrival_time: Any = None,
    ) -> str:
        """Queue a request known only by its prompt length, on an executor that needs no token
        ids (the simulator): no ids are drawn or stored. Otherwise as ``add_request``."""
        if self.needs_token_ids:
            raise RequestError("this engine runs a real model: give the prompt's token ids "
                               "(add_request)")
        if not is_count(prompt_len):
            raise RequestError(f"prompt_len must be a positive integer, got {prompt_len!r}")
        return self._queue(None, prompt_len, max_tokens, request_id, arrival_time)

    def _queue(self, prompt: list[int] | None, prompt_len: Any, max_tokens: Any,
               request_id: Any, arrival_time: Any) -> str:
        if not is_count(max_tokens):
            raise RequestError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if prompt_len + max_tokens > self.max_model_len:
            raise RequestError(
                f"prompt of {prompt_len} tokens plus max_tokens {max_tokens} exceeds the model "
                f"length {self.max_model_len}")
        if arrival_time is None:
            arrival = self.clock.now()
        elif (type(arrival_time) is float or isinstance(arrival_time, Real)
              and not isinstance(arrival_time, bool)) and math.isfinite(arrival_time):
            arrival = float(arrival_time)
        else:  # (a NaN or an infinity would freeze the arrival-rate estimate for good)
            raise RequestError(f"arrival_time must be a finite number of seconds, got "
                               f"{arrival_time!r}")
        if request_id is None:  # the next number no request holds (a caller's "1" may)
            rid = str(next(self._ids))
            while rid in self.scheduler.requests:
                rid = str(next(self._ids))
        else:
            rid = str(request_id)
        if rid in self.scheduler.requests:
            raise RequestError(f"request id {rid!r} is already in use")
        # (numpy's integers as Python's: reports and stats count with them)
        self.scheduler.add(Request(rid, prompt, int(max_tokens), arrival,
                                   prompt_len=int(prompt_len)))
        self._note_arrival(arrival)
        return rid

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- iterations -----------------------------------------------------------------------
    def decision_view(self) -> SchedulerView | None:
        """The view the coming iteration's decision is made on (None: no decision needed)."""
        return self.scheduler.decision_view(self.clock.now())

    def step(self, decision: Decision | None = None) -> IterationReport | None:
        """Run one iteration; None when there is nothing to run.

        ``decision`` overrides the policy for this iteration (the env passes its action here).
        """
        start = self.clock.now()
        plan = self.scheduler.schedule(start, decision)
        if plan is None:
            return None
        self.energy.start()
        result = self.executor.execute(plan)
        self.clock.advance(result.latency_s)
        end = self.clock.now()
        outcome = self.scheduler.postprocess(plan, result.sampled)
        distinct = result.distinct_experts
        traffic = result.traffic or plan_traffic(self.model_config, plan, distinct,
                                                 self.dtype_bytes)
        total_bytes = traffic.weight_bytes + traffic.kv_bytes
        joules = result.energy_j
        if joules is None:
            joules = self.energy.stop(end - start, total_bytes, traffic.flops)
        self._update_stats([end - start], [joules],
                           plan.num_decode_tokens + plan.num_prefill_tokens)
        return IterationReport(
            iteration=plan.iteration, mode=plan.mode, start_time=start, latency_s=end - start,
            decode_tokens=plan.num_decode_tokens, prefill_tokens=plan.num_prefill_tokens,
            stages=[{"batch_id": st.batch_id, "stage": st.stage, "num_groups": st.num_groups,
                     "layers": (st.layer_start, st.layer_end), "tokens": st.num_tokens}
                    for st in plan.stages],
            distinct_experts=distinct, expert_bytes=traffic.expert_bytes,
            weight_bytes=traffic.weight_bytes, kv_bytes=traffic.kv_bytes, flops=traffic.flops,
            energy_j=joules, energy_source=self.energy.source,
            events=[TokenEvent(rid, idx, tok, end) for rid, idx, tok in outcome.emitted],
            finished=outcome.finished, preempted=list(self.scheduler.preempted_last),
            logits=result.logits)

    def step_run(self, until: float, decision: Decision | None = None, limit: int = 512
                 ) -> RunReport | None:
        """Several iterations at once, each exactly as ``step`` would run it, up to the first
        that would start at or after ``until`` (the caller's next event: an arrival, a
        horizon). Only where none needs a decision (``Scheduler.plan_run``), the executor
        prices runs (the simulator) and the clock is virtual; None otherwise, and then
        ``step`` is the way on."""
        if not is_count(limit):
            raise ValueError(f"step_run's limit must be a positive integer, got {limit!r}")
        if until != until:  # NaN: no iteration would stop the run
            raise ValueError("step_run's until must be a time or inf, got NaN")
        execute_run = getattr(self.executor, "execute_run", None)
        start = self.clock.now()
        if (execute_run is None or not isinstance(self.clock, VirtualClock) or start >= until
                or not hasattr(self.energy, "stop_each")):  # (runs are priced, so modeled)
            return None
        run = self.scheduler.plan_run(start, limit, decision)
        if run is None:
            return None
        result = execute_run(run, start, until)
        times = result.times
        n = len(times) - 1
        self.clock.advance_to(times[-1])
        # (as step() reports them: end - start on the clock)
        latencies = [b - a for a, b in zip(times, times[1:])]
        joules = self.energy.stop_each(latencies, result.moved_bytes, result.flops)
        self._update_stats(latencies, joules, run.iteration_tokens(n) if run.joined
                           else run.num_tokens)
        first_index = tuple(len(self.scheduler.requests[s.request_id].output_token_ids)
                            for s in run.decode)
        outcome = self.scheduler.commit_run(run, n, result.token)
        end = run.batch_end
        return RunReport(
            first_iteration=run.first_iteration, iterations=n, times=times,
            latencies=latencies, request_ids=tuple(s.request_id for s in run.decode),
            first_token_index=first_index, energy_j=joules,
            expert_bytes=sum(result.expert_bytes), total_bytes=sum(result.moved_bytes),
            flops=sum(result.flops), energy_source=self.energy.source,
            finished=outcome.finished, emitted=tuple((rid, i) for rid, i, _ in outcome.emitted),
            emitted_at=-1 if end is None or end >= n else end)

    def _update_stats(self, latencies: Sequence[float], joules: Sequence[float],
                      tokens: int | Sequence[int]) -> None:
        """Fold iterations (in order; each with ``tokens`` tokens, or its own count) into the
        moving averages."""
        old = self.scheduler.stats
        a = STATS_SMOOTHING
        latency, per_token = old.iteration_latency_s, old.energy_per_token_j
        b = 1 - a
        if isinstance(tokens, int):
            for lat, j in zip(latencies, joules):
                latency = b * latency + a * lat
                per_token = b * per_token + a * (j / tokens if tokens else per_token)
        else:
            for lat, j, count in zip(latencies, joules, tokens):
                latency = b * latency + a * lat
                per_token = b * per_token + a * (j / count if count else per_token)
        self.scheduler.stats = EngineStats(latency, old.arrival_rate, per_token)

    def _note_arrival(self, t: float) -> None:
        # Rate from an EMA of inter-arrival gaps; the first arrival only sets the reference.
        old = self.scheduler.stats
        if self._last_arrival is not None and t > self._last_arrival:
            gap = t - self._last_arrival
            prev = 1.0 / old.arrival_rate if old.arrival_rate > 0 else gap
            rate = 1.0 / ((1 - STATS_SMOOTHING) * prev + STATS_SMOOTHING * gap)
            self.scheduler.stats = EngineStats(old.iteration_latency_s, rate,
                                               old.energy_per_token_j)
        self._last_arrival = t if self._last_arrival is None else max(self._last_arrival, t)

    def run(self) -> list[IterationReport]:
        """Step until every queued request has finished."""
        reports = []
        while self.has_unfinished():
            report = self.step()
            if report is None:
                raise RuntimeError("requests are queued but none can be scheduled")
            reports.append(report)
        return reports


def warm_up(executor, config: EngineConfig, model_config: ModelConfig, tokens: int = 32) -> None:
    """Run one small request through ``executor`` on a throwaway engine, so that one-time
    costs (allocator, first touch of buffers) do not land on a measured iteration."""
    engine = Engine(config, executor=executor, model_config=model_config,
                    decide=lambda view: Decision(1, view.fcfs_admission()))
    engine.add_request([i % model_config.vocab_size for i in range(tokens)], 2)
    engine.run()
    if hasattr(executor, "reset"):
        executor.reset()
