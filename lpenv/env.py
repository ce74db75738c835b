"""The Gymnasium environment around the layered-prefill engine."""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from engine_adapter.clock import VirtualClock
from engine_adapter.config import EngineConfig
from engine_adapter.decision import SchedulerView
from engine_adapter.engine import Engine, max_model_len, warm_up
from engine_adapter.errors import is_count
from engine_adapter.model_config import ModelConfig
from lpenv.actions import ActionCodec
from lpenv.backends import BackendConfig, build_executor, check_backend
from lpenv.episode import Episode
from lpenv.observation import CLIP, ObservationSpec
from lpenv.render import Frame, FramePainter
from lpenv.reward import SLO, RewardConfig
from lpenv.sections import build_section
from lpenv.workload import WorkloadConfig, generate

# The env's own defaults (a small model and workload: an episode in seconds on a CPU); a
# partial ``engine`` or ``workload`` mapping keeps the keys it does not give.
ENGINE_DEFAULTS = {"model": "qwen3-moe-tiny", "kv_cache_tokens": 8192, "prefill_budget": 512}
WORKLOAD_DEFAULTS = {"lengths": "arxiv4k", "scale": 0.05, "rate": 4.0, "num_requests": 16}


class LayeredPrefillEnv(gym.Env):
    """Choose each prefill batch's layer-group count G and admission on a real MoE engine.

    ## Description
    A workload of requests arrives, in trace time, at a layered-prefill serving engine (the
    real MoE model of ``engine_adapter``). Whenever a prefill batch can be formed, the agent
    chooses how many layer groups G to split it into, how much of the queue to admit (first
    come, first served, up to a token-budget level) and whether to start it now (even while
    another batch is still in flight) or wait. Between decisions the engine runs on its own:
    decode tokens pass every layer every iteration, in-flight batches advance one layer group
    per iteration. Time is a virtual clock advanced by each iteration's latency (measured on
    the real engine, or modeled), so the outcome does not depend on how long the agent thinks.

    ## Action Space
    ``MultiDiscrete([len(group_choices), admission_levels, 2])``: G index, admission level,
    wait/start. See ``lpenv.actions`` for the encoding. ``action_masks()`` (for sb3-contrib's
    ``MaskablePPO``) and ``info["action_mask"]`` give the valid values; a masked action raises
    ``InvalidAction`` (plain PPO: wrap the env in ``policies.sb3.RefuseInvalid``; a policy to
    export: train it under ``policies.sb3.ServingMask``, the mask a server applies).

    ## Observation Space
    ``Box(0, 10, (3 + 2 * queue_slots + 10,), float32)``: queue length and tokens, head-of-line
    wait against the TTFT SLO, the first ``queue_slots`` waiting requests' tokens and waits,
    decode batch size and context lengths, KV utilization, in-flight prefill work, recent
    iteration latency against the TBT SLO, arrival-rate estimate, recent energy per token.
    See ``lpenv.observation``; ``info`` carries the raw figures.

    ## Rewards
    Paid so that the return of an episode that terminates equals ``info["summary"]``'s
    ``slo_attainment - energy_weight x energy_per_token_j`` (``lpenv.reward``): +1 on the
    first step, -1/N when a request is known to miss its SLO (TTFT, or any TBT gap; N: the
    requests arriving after the workload's ``warmup_s``, the ones the summary counts), and
    -energy_weight x joules / tokens per iteration; the last step settles the rest.

    ## Starting State
    ``reset(seed=...)`` draws a new workload (arrival times, lengths, token ids) from the seed
    and builds a fresh engine (the model's weights are built once per process and shared);
    the episode starts at the first decision point.

    ## Episode End
    Terminated when every request of the workload has arrived and finished. Truncated when the
    virtual clock passes ``horizon_s`` or after ``max_decisions`` decisions, if set: the last
    observation is the state the episode was cut in, and nothing is settled (the return holds
    the misses known by then; what the unfinished requests would have attained is for a value
    estimate to bootstrap, as Gymnasium means truncation); ``info["summary"]`` counts them as
    missing their SLO. Where ``reset`` finds nothing to decide (every request rejected, or the
    horizon before the first arrival), the first step ends the episode whatever the action.

    ## Arguments
    ``gymnasium.make("lpenv/LayeredPrefill-v1", engine=..., workload=..., slo=..., reward=...,
    backend=..., group_choices=None, admission_levels=4, allow_stagger=True, queue_slots=8,
    horizon_s=None, max_decisions=None, rate_scale=None, energy_scale=0.01,
    render_mode=None)``; ``rate_scale`` (req/s; None: the workload's rate, or its
    ``rate_max``) and
    ``energy_scale`` (J per token) normalize the observation's arrival rate and energy per
    token (``lpenv.observation``); ``engine``, ``workload``,
    ``reward`` and ``backend`` take their config dataclasses or mappings (Hydra configs),
    ``slo`` a mapping ``{ttft_s, tbt_s}``. A mapping for ``engine`` or ``workload`` goes over
    the env's defaults (``ENGINE_DEFAULTS``: qwen3-moe-tiny, 8,192 KV tokens, budget 512;
    ``WORKLOAD_DEFAULTS``: arxiv4k lengths x 0.05, 4 req/s, 16 requests): the keys it does not
    give keep them. The engine always runs in layered mode here.
    ``backend={"name": "sim", "hardware": "h100-sxm-tp2", "routing": "uniform"}`` runs the
    simulator instead of the real model (``lpenv.backends``): hardware profiles from
    ``engine_adapter.hardware`` (``cpu-auto`` once ``lpenv-calibrate`` has run), routing
    ``uniform``, ``zipf:S`` or ``empirical:PATH``; a calibrated profile's latency scatter is
    drawn from a stream seeded by ``reset(seed=...)`` (``latency_noise=False`` turns it off).
    ``workload={"duration_s": 600, "warmup_s": 60, ...}``: arrivals over a window whose first
    ``warmup_s`` seconds are left out of ``info["summary"]``'s request metrics. On the sim
    backend the iterations between decision points go in runs (``Engine.step_run``), with
    the same results as one by one; ``allow_stagger=False`` caps the engine at one batch in
    flight (``max_batches_in_flight``), so no step stops where the only choice is to wait.
    ``render_mode``: ``ansi`` (``render()`` returns the state as text), ``human`` (prints it
    at every step) or ``rgb_array`` (``render()`` returns a 480 x 640 x 3 image of the queue,
    the batches in flight and the decode batch: ``lpenv.render``; stable-baselines3's
    ``make_vec_env`` asks for it, ``VecVideoRecorder`` films it).

    ## Version History
    * v1 (2026-11-29): an episode cut short (``horizon_s``, ``max_decisions``) is truncated
      without settling the objective and observes the state it was cut in (v0 settled it and
      observed zeros, so a bootstrapped value was added to a settled return); warm-up
      requests cost the reward nothing, as the summary leaves them out; one seed draws one
      workload on every backend; an episode with nothing to decide at reset ends at the first
      step (v0 raised); a partial ``engine`` or ``workload`` mapping keeps the env's other
      defaults; ``rgb_array`` rendering. ``gymnasium.make`` of v0 names v1.
    * v0: initial version.
    """

    metadata = {"render_modes": ["ansi", "human", "rgb_array"], "render_fps": 4}

    def __init__(self, engine: Any = None, workload: Any = None, slo: Any = None,
                 reward: Any = None, backend: Any = None,
                 group_choices: list[int] | None = None, admission_levels: int = 4,
                 allow_stagger: bool = True, queue_slots: int = 8,
                 horizon_s: float | None = None, max_decisions: int | None = None,
                 rate_scale: float | None = None, energy_scale: float = 0.01,
                 render_mode: str | None = None) -> None:
        self.engine_config = build_section(EngineConfig, engine, "engine", ENGINE_DEFAULTS)
        if not allow_stagger and self.engine_config.max_batches_in_flight is None:
            # No batch may start while one is in flight: the engine enforces it, and runs
            # those iterations without stopping at a decision point that has one choice.
            self.engine_config = replace(self.engine_config, max_batches_in_flight=1)
        if self.engine_config.mode != "layered":
            raise ValueError("the env drives layered mode; the chunked baseline is evaluated "
                             "with lpenv-eval policy=chunked")
        self.workload_config = build_section(WorkloadConfig, workload, "workload",
                                             WORKLOAD_DEFAULTS)
        self.slo = build_section(SLO, slo or {"ttft_s": 2.0, "tbt_s": 0.1}, "slo")
        self.reward_config = build_section(RewardConfig, reward, "reward")
        self.backend = build_section(BackendConfig, backend, "backend")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']}")
        self.render_mode = render_mode
        if horizon_s is not None and not horizon_s > 0:
            raise ValueError(f"horizon_s must be positive or None, got {horizon_s!r}")
        if max_decisions is not None and not is_count(max_decisions):
            raise ValueError(f"max_decisions must be a positive integer or None, got "
                             f"{max_decisions!r}")
        self.horizon_s, self.max_decisions = horizon_s, max_decisions

        self.model_config = ModelConfig.load(self.engine_config.model)
        check_backend(self.backend, self.engine_config, self.model_config)
        self.max_model_len = max_model_len(self.engine_config, self.model_config)
        self.codec = ActionCodec.for_layers(self.model_config.num_layers, group_choices,
                                            admission_levels, allow_stagger)
        self.obs_spec = ObservationSpec(
            ttft_slo_s=self.slo.ttft_s, tbt_slo_s=self.slo.tbt_s,
            prefill_budget=self.engine_config.prefill_budget,
            max_num_seqs=self.engine_config.max_num_seqs, max_model_len=self.max_model_len,
            num_layers=self.model_config.num_layers, queue_slots=queue_slots,
            rate_scale=(self.workload_config.rate_max or self.workload_config.rate)
            if rate_scale is None else rate_scale,
            energy_scale=energy_scale)
        self.action_space = spaces.MultiDiscrete(self.codec.nvec)
        self.observation_space = spaces.Box(0.0, CLIP, (self.obs_spec.size,), np.float32)
        self._executor = None
        self.episode: Episode | None = None
        self.view: SchedulerView | None = None
        self._painter: FramePainter | None = None

    # ---- Gymnasium API ----------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if self._executor is None:
            self._executor = build_executor(self.backend, self.engine_config, self.model_config)
            if not self.backend.deterministic:
                # One-time costs (allocator, first touch of buffers) off the first measured
                # episode, as lpenv-eval does: its first iteration took 0.13-0.20 s, not 3 ms.
                warm_up(self._executor, self.engine_config, self.model_config)
        self._executor.reset()
        # The workload first: one seed, one workload, on every backend.
        requests = generate(self.workload_config, self.np_random)
        if hasattr(self._executor, "reseed"):  # the simulator's latency noise, by this seed
            self._executor.reseed(int(self.np_random.integers(2**31)))
        engine = Engine(self.engine_config, executor=self._executor, clock=VirtualClock(),
                        model_config=self.model_config)
        self.episode = Episode(engine, requests, self.slo, self.reward_config, self.np_random,
                               self.horizon_s,
                               measure_from_s=self.workload_config.warmup_s)
        self.view = self.episode.next_decision(self.codec.is_decision_point)
        # Nothing to decide at all (every request rejected, or the horizon before the first
        # arrival): Gymnasium has no episode that ends at reset, so the next step ends it,
        # whatever the action.
        self._ended_at_reset = self.view is None
        if self._ended_at_reset:
            self._end()
        self._pending_reward = self.episode.rewards.take()
        if self.render_mode == "human":
            print(self.render_text())
        return self.codec_obs(), self._info()

    def step(self, action):
        if self.episode is None:
            raise RuntimeError("call reset() before step()")
        ep = self.episode
        if self.view is None:
            if not self._ended_at_reset:
                raise RuntimeError("the episode is over: call reset()")
            self._ended_at_reset = False
            terminated, truncated = self._outcome()
        else:
            decision = self.codec.decode(action, self.view, ep.can_wait())
            ep.decisions += 1
            ep.apply(decision)
            self.view = ep.next_decision(self.codec.is_decision_point)
            terminated, truncated = self._outcome()
            if terminated or truncated:
                self._end()
        reward = self._pending_reward + ep.rewards.take()
        self._pending_reward = 0.0
        if self.render_mode == "human":
            print(self.render_text())
        return self.codec_obs(), reward, terminated, truncated, self._info()

    def _outcome(self) -> tuple[bool, bool]:
        """(terminated, truncated): every request served, or cut short (not both)."""
        ep = self.episode
        terminated = ep.finished
        truncated = not terminated and (ep.truncated or (
            self.max_decisions is not None and ep.decisions >= self.max_decisions))
        return terminated, truncated

    def _end(self) -> None:
        """The episode ends here. Served to the end, the last reward settles the objective;
        cut short (truncated), nothing is settled: what the requests still to finish would
        have attained is for the agent's value estimate, as Gymnasium means truncation
        (``info["summary"]`` counts them as missed, the paper's metric)."""
        terminated, _ = self._outcome()
        self.view = None
        self.episode.close(settle=terminated)

    def action_masks(self) -> np.ndarray:
        can_wait = self.episode.can_wait() if self.episode else True
        return self.codec.masks(self.view, can_wait)

    def render(self):
        if self.render_mode == "ansi":
            return self.render_text()
        if self.render_mode == "human":
            print(self.render_text())
        if self.render_mode == "rgb_array":
            if self.episode is None:
                raise RuntimeError("call reset() before render()")
            if self._painter is None:
                self._painter = FramePainter()
            return self._painter.paint(Frame.of(self.episode))
        return None

    def close(self) -> None:
        if self._painter is not None:
            self._painter.close()
            self._painter = None
        super().close()

    # ---- helpers ----------------------------------------------------------------------------
    def codec_obs(self) -> np.ndarray:
        view = self.view
        if view is None and self.episode is not None:  # the state the episode ended in
            view = self.episode.engine.scheduler.view(self.episode.now)
        return self.obs_spec.encode(view)

    def _info(self) -> dict:
        ep = self.episode
        sched = ep.engine.scheduler
        info = {
            "time_s": ep.now, "decisions": ep.decisions,
            "waiting": len(sched.waiting), "decoding": len(sched.decoding),
            "in_flight": [(b.batch_id, b.stage, b.num_groups) for b in sched.batches],
            "free_kv_blocks": ep.engine.blocks.num_free,
            "arrived": len(ep.recorder.requests), "missed": len(ep.rewards.missed),
            "energy_j": ep.recorder.energy_j, "action_mask": self.action_masks(),
        }
        if ep.closed:
            info["summary"] = ep.summary()
        return info

    def render_text(self) -> str:
        return "(not reset)" if self.episode is None else Frame.of(self.episode).text()

    def config_dict(self) -> dict:
        """The configuration an exported policy records."""
        return {"engine": asdict(self.engine_config), "workload": asdict(self.workload_config),
                "slo": asdict(self.slo), "reward": asdict(self.reward_config),
                "backend": asdict(self.backend), "actions": self.codec.to_json(),
                "observation": self.obs_spec.to_json(), "horizon_s": self.horizon_s,
                "max_decisions": self.max_decisions}
