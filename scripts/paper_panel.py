"""lpenv-paper: one panel of the paper's SLO-attainment-against-rate experiment, on the simulator.

    lpenv-paper arxiv-qwen        # or arxiv-gptoss, sharegpt-qwen, sharegpt-gptoss, all

Each panel is the paper's setup (``../shared/PAPER.md``): its model (Qwen3-30B-A3B or
GPT-OSS-20B), 2 x H100 SXM in tensor parallel 2 (``hardware=h100-sxm-tp2``), BF16, 256 running
requests, model length 32,768; its workload (arXiv or ShareGPT lengths at full scale, Poisson
arrivals, 600 s after a 60 s warm-up); its SLOs; and its rate range. Two policies: chunked
prefill with a 512-token budget, and layered prefill with the paper's rule (prefill budget
8,192, G from the batch's tokens in units of 512, at most 16 groups for Qwen and 12 for
GPT-OSS). Every run is an ``lpenv-eval`` run (the same config tree, ``backend.name=sim``);
the runs go in parallel, then ``lpenv-sweep-report`` draws the figure and the goodput table.

arXiv prompts longer than the model length allows (about 2% of the trace) are clipped to
32,256 tokens so that prompt plus output fit in 32,768.

Writes ``<out>/<panel>/`` (default ``results/paper``): one folder per run with its
``summary.json``, ``requests.csv`` and ``.hydra/`` config (as ``lpenv-eval`` leaves them),
``attainment_vs_rate.png``, the TTFT/TBT CDFs, ``goodput.csv``, ``runs.csv`` and
``panel.json`` (the figures quoted per policy and rate). These are of this call's runs alone:
run folders an earlier call left there (other rates) are named and left out.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


@dataclass(frozen=True)
class Panel:
    workload: str
    model: str
    ttft_s: float
    tbt_s: float
    rates: tuple[float, ...]
    max_groups: int

    @property
    def max_prompt(self) -> int:
        return 32256 if self.workload == "arxiv" else 32768 - 1024


PANELS = {
    "arxiv-qwen": Panel("arxiv", "qwen3-30b-a3b", 10.0, 0.125, (1.3, 1.4, 1.5, 1.6, 1.7, 1.8), 16),
    "arxiv-gptoss": Panel("arxiv", "gpt-oss-20b", 10.0, 0.100, (2.1, 2.3, 2.5, 2.7, 2.9, 3.1), 12),
    "sharegpt-qwen": Panel("sharegpt", "qwen3-30b-a3b", 5.0, 0.125, (4.0, 4.2, 4.4, 4.6, 4.8, 5.0),
                           16),
    "sharegpt-gptoss": Panel("sharegpt", "gpt-oss-20b", 5.0, 0.100,
                             (5.8, 6.0, 6.2, 6.4, 6.6, 6.8), 12),
}
POLICIES = ("chunked", "paper")
LABELS = {"chunked": "chunked-512", "paper": "layered-paper-rule"}


def overrides(panel: Panel, policy: str, rate: float, duration_s: float, warmup_s: float,
              hardware: str) -> list[str]:
    common = [
        "engine=paper", f"model={panel.model}", f"workload={panel.workload}",
        "workload.scale=1.0", "workload.min_prompt=1", f"workload.max_prompt={panel.max_prompt}",
        "workload.min_output=1", "workload.max_output=1024", f"workload.rate={rate}",
        f"workload.duration_s={duration_s}", f"workload.warmup_s={warmup_s}",
        f"slo.ttft_s={panel.ttft_s}", f"slo.tbt_s={panel.tbt_s}",
        "backend.name=sim", f"backend.hardware={hardware}", "progress=false", "warmup=false",
        f"policy={policy}", f"policy.label={LABELS[policy]}",
    ]
    if policy == "paper":
        common += [f"policy.max_groups={panel.max_groups}", "policy.unit=512"]
    return common


def run_one(args: tuple[list[str], str]) -> dict:
    """One lpenv-eval run (in a worker process), its config saved where Hydra saves a run's,
    for lpenv-sweep-report to tell runs of other settings apart."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from scripts.evaluate import CONFIG_DIR, evaluate

    overrides_, out_dir = args
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("evaluate", overrides=overrides_)
    summary = evaluate(cfg, Path(out_dir), overrides_)
    hydra_dir = Path(out_dir) / ".hydra"
    hydra_dir.mkdir(exist_ok=True)
    OmegaConf.save(cfg, hydra_dir / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(overrides_)), hydra_dir / "overrides.yaml")
    return summary


def check_runs(names: list[str], duration_s: float, warmup_s: float, hardware: str,
               rates: list[float] | None = None) -> str | None:
    """What is wrong with the panels' runs, as lpenv-eval would say it (each policy's first
    run, per panel: the rates differ only in the rate), or None."""
    from hydra import compose, initialize_config_dir

    from scripts.evaluate import CONFIG_DIR, ConfigProblem, build

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        for name in names:
            for policy in POLICIES:
                rate = (rates or PANELS[name].rates)[0]
                try:
                    build(compose("evaluate", overrides=overrides(
                        PANELS[name], policy, rate, duration_s, warmup_s, hardware)))
                except ConfigProblem as exc:
                    return f"{name}, {LABELS[policy]}: {exc}"
    return None


def run_panels(names: list[str], out: Path, jobs: int, duration_s: float, warmup_s: float,
               hardware: str, rates: tuple[float, ...] | None = None) -> list[dict]:
    """Every run of the named panels in one pool of workers (each imports the stack once,
    and no panel waits for the slowest run of the one before), then each panel's report."""
    work = {name: [(overrides(PANELS[name], policy, rate, duration_s, warmup_s, hardware),
                    str(out / name / f"{policy}-{rate:g}"))
                   for policy in POLICIES for rate in (rates or PANELS[name].rates)]
            for name in names}
    summaries: dict[str, list[dict]] = {name: [] for name in names}
    ctx = multiprocessing.get_context("spawn")  # fork hangs with torch's threads
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = {pool.submit(run_one, w): name for name, ws in work.items() for w in ws}
        for f in tqdm(as_completed(futures), total=len(futures), desc="paper", unit="run"):
            summaries[futures[f]].append(f.result())
    return [panel_report(name, out / name, summaries[name], [Path(w[1]) for w in work[name]],
                         rates or PANELS[name].rates, duration_s, warmup_s, hardware)
            for name in names]


def run_panel(name: str, out: Path, jobs: int, duration_s: float, warmup_s: float,
              hardware: str, rates: tuple[float, ...] | None = None) -> dict:
    return run_panels([name], out, jobs, duration_s, warmup_s, hardware, rates)[0]


def panel_report(name: str, folder: Path, summaries: list[dict], run_dirs: list[Path],
                 rates: tuple[float, ...], duration_s: float, warmup_s: float,
                 hardware: str) -> dict:
    """The sweep report (figure, goodput) and ``panel.json`` of one panel's runs: those in
    ``run_dirs`` (this call's), not whatever else lies in ``folder``."""
    from scripts.sweep_report import report

    panel = PANELS[name]
    earlier = sorted({p.parent.name for p in folder.glob("*/summary.json")}
                     - {d.name for d in run_dirs})
    if earlier:
        print(f"{folder}: left out the runs of an earlier call: {', '.join(earlier)}")
    result = report(run_dirs, folder)
    print(result["table"])
    keys = ("policy", "rate", "slo_attainment", "ttft_mean_s", "e2e_mean_s", "expert_bytes",
            "energy_per_token_j", "energy_source", "requests_total", "requests_warmup",
            "wall_time_s", "sim_time_s")
    rows = sorted(({k: s.get(k) for k in keys} for s in summaries),
                  key=lambda r: (r["policy"], r["rate"]))
    panel_json = {"panel": name, **panel.__dict__, "rates": list(rates), "hardware": hardware,
                  "duration_s": duration_s, "warmup_s": warmup_s, "runs": rows,
                  "goodput": result.get("goodput")}
    panel_json["policies"] = policy_figures(rows)
    (folder / "panel.json").write_text(json.dumps(panel_json, indent=2) + "\n")
    print(format_figures(name, panel_json["policies"]))
    return panel_json


def policy_figures(rows: list[dict], target: float = 0.9) -> dict:
    """Per policy: the first rate whose attainment falls below the target, and the means at
    the panel's lowest rate (where queueing has not yet taken over)."""
    out = {}
    for policy in sorted({r["policy"] for r in rows}):
        mine = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["rate"])
        below = next((r["rate"] for r in mine if r["slo_attainment"] < target), None)
        low = mine[0]
        out[policy] = {"falls_below_90_at": below, "at_rate": low["rate"],
                       "ttft_mean_s": low["ttft_mean_s"], "e2e_mean_s": low["e2e_mean_s"],
                       "expert_bytes": low["expert_bytes"],
                       "energy_per_token_j": low["energy_per_token_j"],
                       "energy_source": low["energy_source"]}
    return out


def format_figures(name: str, figures: dict) -> str:
    lines = [f"{name}: {'policy':20s} {'< 90% at':>9s} {'TTFT mean':>10s} {'e2e mean':>9s} "
             f"{'expert TB':>10s} {'mJ/token':>9s}  (means at the lowest rate)"]
    for policy, f in figures.items():
        below = f"{f['falls_below_90_at']:g}" if f["falls_below_90_at"] else "never"
        lines.append(f"{'':{len(name) + 1}s} {policy:20s} {below:>9s} {f['ttft_mean_s']:9.2f}s "
                     f"{f['e2e_mean_s']:8.2f}s {f['expert_bytes'] / 1e12:10.1f} "
                     f"{f['energy_per_token_j'] * 1e3:9.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("panel", choices=[*PANELS, "all"])
    p.add_argument("--out", default="results/paper")
    p.add_argument("--jobs", type=int, default=max(1, multiprocessing.cpu_count()),
                   help="runs in parallel (the simulator's results do not depend on it)")
    p.add_argument("--duration", type=float, default=600.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=60.0, help="warm-up seconds per run")
    p.add_argument("--hardware", default="h100-sxm-tp2")
    p.add_argument("--rates", type=float, nargs="*", default=None,
                   help="override the panel's rates")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.rates is not None and (not args.rates or min(args.rates) <= 0):
        p.error(f"--rates must be positive request rates, got {args.rates}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} is a file, not a folder")
    names = list(PANELS) if args.panel == "all" else [args.panel]
    problem = check_runs(names, args.duration, args.warmup, args.hardware, args.rates)
    if problem:
        p.error(problem)  # before any worker starts: a bad profile, a machine too small
    panels = run_panels(names, Path(args.out), args.jobs, args.duration, args.warmup,
                        args.hardware, tuple(args.rates) if args.rates else None)
    if len(panels) > 1:  # (each panel printed its own figures as it finished)
        print(f"predicted on the simulator ({args.hardware}); energy modeled")
        for panel in panels:
            print(format_figures(panel["panel"], panel["policies"]))


if __name__ == "__main__":
    main()
