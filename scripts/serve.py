"""lpenv-serve: one policy on the real engine, on the wall clock, behind an OpenAI-compatible API.

    lpenv-serve                                        # the paper rule, qwen3-moe-cpu, CPU
    lpenv-serve policy=learned policy.path=results/learned/policy
    curl -s localhost:8000/v1/completions -d '{"prompt": "hello", "max_tokens": 8}'

The policy is any of ``lpenv-eval``'s (an exported one is read from JSON and safetensors,
never unpickled); the engine, model and SLO sections are the same too. The server binds
127.0.0.1 unless ``host=`` says otherwise. ``GET /metrics`` gives Prometheus' text format:
requests by outcome, SLO attainment, TTFT, TBT and end-to-end histograms, prefill batches
by layer groups, energy and expert bytes (``engine_adapter.serving_metrics``).
"""

from __future__ import annotations

import logging
import signal
import sys
from dataclasses import dataclass

import hydra
from omegaconf import DictConfig

from engine_adapter.clock import WallClock
from engine_adapter.engine import Engine, warm_up
from engine_adapter.errors import ConfigError
from engine_adapter.openai_api import CompletionServer
from engine_adapter.serving import ServingLoop
from engine_adapter.serving_metrics import ServingMetrics
from engine_adapter.text_codec import text_codec
from lpenv.backends import build_executor
from lpenv.config_schema import ServeConfig, check_top_level, register_configs, to_dataclass
from scripts.evaluate import CONFIG_DIR, ConfigProblem, engine_and_policy

register_configs()
log = logging.getLogger("lpenv.serve")


@dataclass
class Server:
    """A started server: its HTTP side and its serving loop."""

    http: CompletionServer
    loop: ServingLoop

    @property
    def url(self) -> str:
        host, port = self.http.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.loop.stop()


def start(cfg: DictConfig, loop_thread: bool = True) -> Server:
    """Build the engine and the policy from ``cfg``, start the HTTP server in a thread of its
    own (``port=0`` takes a free port) and the serving loop in another (``loop_thread``), or
    leave the loop for the caller to ``run`` (the main thread: faster, see
    ``ServingLoop.start``)."""
    try:
        check_top_level(cfg, ServeConfig)
        slo, backend = to_dataclass("slo", cfg.slo), to_dataclass("backend", cfg.backend)
        if backend.name != "torch" or backend.latency != "measured":
            raise ValueError("lpenv-serve serves live traffic on the real engine: "
                             "backend.name=torch, backend.latency=measured")
        if backend.latency_scale != 1:
            raise ValueError("backend.latency_scale scales a virtual clock; the server runs "
                             "on the wall clock")
        if not 0 <= cfg.port < 65536:
            raise ValueError(f"port must be 0-65535, got {cfg.port}")
        engine_cfg, model, policy = engine_and_policy(cfg, slo, backend)
        codec = text_codec(cfg.tokenizer, model.vocab_size)
        executor = build_executor(backend, engine_cfg, model)
    except (ConfigError, ValueError, TypeError, FileNotFoundError) as exc:
        raise ConfigProblem(str(exc)) from exc
    if cfg.warmup:
        warm_up(executor, engine_cfg, model)
    engine = Engine(engine_cfg, executor=executor, clock=WallClock(), model_config=model)
    name = cfg.served_model_name or engine_cfg.model
    info = {"model": name, "policy": str(cfg.policy.name), "mode": engine_cfg.mode}
    loop = ServingLoop(engine, policy, ServingMetrics(slo.ttft_s, slo.tbt_s, info))
    if loop_thread:
        loop.start()
    try:
        http = CompletionServer((cfg.host, cfg.port), loop, codec, name)
    except OSError as exc:
        loop.stop()
        raise ConfigProblem(f"cannot listen on {cfg.host}:{cfg.port}: {exc}") from exc
    http.serve_in_thread()
    return Server(http, loop)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="serve")
def _main(cfg: DictConfig) -> None:
    try:
        server = start(cfg, loop_thread=False)
    except ConfigProblem as exc:
        sys.exit(f"lpenv-serve: invalid configuration: {exc}")
    print(f"lpenv-serve: {cfg.policy.name} on {cfg.engine.model} ({server.loop.engine.config.mode}"
          f" prefill), serving {server.http.model!r} at {server.url} (POST /v1/completions, "
          f"GET /metrics); Ctrl-C or SIGTERM stops", flush=True)
    # Ctrl-C and SIGTERM stop the loop after its iteration, open streams ending cleanly: a
    # KeyboardInterrupt could land while the loop holds its lock and leave it held.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.loop.request_stop())
    try:
        server.loop.run()  # (here, in the main thread, until stopped or an iteration fails)
    finally:
        server.stop()
    if server.loop.error:
        sys.exit(f"lpenv-serve: the serving loop stopped: {server.loop.error}")


def main() -> None:
    _main()


if __name__ == "__main__":
    main()

