"""lpenv-sweep-report: the paper's figure and a goodput table from an lpenv-eval multirun.

Reads every ``summary.json`` (and the ``requests.csv`` beside it) under the given folders and
writes, into ``--out`` (default: the first folder):

* ``attainment_vs_rate.png``: SLO attainment against request rate, one line per policy (and
  setting, see below), with the 90% target (the paper's main figure); one panel per scenario
  (workload, model, SLOs);
* ``ttft_cdf.png``, ``tbt_cdf.png``: CDFs of TTFT and of every gap between tokens, per line,
  one panel per scenario and rate, the SLO as a dashed line;
* ``goodput.csv``: per scenario and line, the goodput (DistServe's sense: the highest rate
  tested whose attainment is >= the target, and every lower rate's too) and the attainment at
  each rate;
* ``runs.csv``: one row per run, its line and the main figures of its summary.

and prints the run table and the goodput table. A line is a policy label together with every
setting that differs between that policy's runs other than rate and seed (read from the run's
``.hydra/config.yaml``, else from its summary), e.g. ``chunked engine.chunk_tokens=64``: only
runs that differ by seed alone are averaged. TTFT and gaps are those of
``lpenv.metrics.RequestRecord``, rebuilt from each run's token times, of the requests its
summary counts (those arriving at or after the warm-up's end).

Example::

    lpenv-eval -m policy=fixed policy.groups=1,2,4,8 workload.rate=2,3,4,5
    lpenv-sweep-report multirun/eval/<date>/<time>
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from lpenv.metrics import RequestRecord, goodput, measured, tbt_gaps_of

TARGET = 0.9
# A scenario is what its lines are compared under: the real engine and vLLM, measured on the
# same machine at the same pace, share one (their lines tell them apart); the simulator's
# latency ("simulated:<profile>") sets its runs apart.
SCENARIO_KEYS = ("workload", "model", "latency", "ttft_slo_s", "tbt_slo_s")
# Settings that may differ between runs averaged into one point: the x axis and the seeds.
ACROSS = {"workload.rate", "seed", "progress"}
# A run without a Hydra config (e.g. evaluate() called directly): the settings its summary
# records, under their config names so that lines read the same either way.
SUMMARY_SETTINGS = {"policy_name": "policy.name", "mode": "engine.mode",
                    "device": "engine.device", "hardware": "backend.hardware",
                    "arrival": "workload.arrival", "num_requests": "workload.num_requests",
                    "duration_s": "workload.duration_s", "warmup_s": "workload.warmup_s"}
RUN_COLUMNS = ("line", "policy", "rate", "workload", "model", "seed", "slo_attainment",
               "ttft_attainment", "tbt_attainment", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s",
               "tbt_p50_s", "tbt_p99_s", "e2e_mean_s", "throughput_tok_s",
               "energy_per_token_j", "expert_bytes", "requests_finished", "requests_total",
               "sim_time_s", "wall_time_s", "run_dir")


# ---- reading ---------------------------------------------------------------------------------
def load_runs(folders: Iterable[Path]) -> list[dict]:
    """Every summary.json under ``folders``, with ``run_dir`` and its ``line`` added; sorted
    for stable output."""
    runs = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("summary.json")):
            run = json.loads(path.read_text())
            if "slo_attainment" not in run or "policy" not in run:
                continue  # some other summary.json (e.g. a training run's)
            run["run_dir"] = str(path.parent)
            runs.append(run)
    label_lines(runs)
    return sorted(runs, key=lambda r: (scenario_of(r), r["line"], r["rate"], r["run_dir"]))


def run_settings(run: dict) -> dict[str, Any] | None:
    """The run's configuration as dotted keys, from the ``.hydra/config.yaml`` Hydra wrote
    beside it (every setting, as composed; interpolations unresolved, so a setting shows where
    it was set), or None where there is none."""
    path = Path(run["run_dir"]) / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    return _flat(OmegaConf.to_container(OmegaConf.load(path), resolve=False))


def summary_settings(run: dict) -> dict[str, Any]:
    """The settings a summary records (fewer than a config: the fallback)."""
    out = {name: run.get(key) for key, name in SUMMARY_SETTINGS.items()}
    if run.get("duration_s") is not None:  # then the count is drawn, not set
        out["workload.num_requests"] = None
    out.update(_flat(run.get("policy_params") or {}, "policy."))
    return out


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def label_lines(runs: Sequence[dict]) -> None:
    """Set each run's ``line``: its policy label and every setting that differs between the
    runs of that label and scenario, apart from rate and seed. Each policy's runs are compared
    among themselves (another policy's own settings are no difference); from their configs
    where every one has one, else from their summaries."""
    by_policy: dict = defaultdict(list)
    for run in runs:
        by_policy[scenario_of(run), str(run["policy"])].append(run)
    for (_, policy), group in by_policy.items():
        configs = [run_settings(run) for run in group]
        settings = (configs if all(c is not None for c in configs)
                    else [summary_settings(run) for run in group])
        keys = sorted({k for s in settings for k in s} - ACROSS)
        differ = [k for k in keys if len({_text(s.get(k)) for s in settings}) > 1]
        for run, s in zip(group, settings):
            run["line"] = " ".join([policy, *(f"{k}={_text(s.get(k))}" for k in differ)])


def _text(value: Any) -> str:
    """A setting as an override would write it."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return str(value)


def counted(run: dict, recs: Sequence[RequestRecord]) -> list[RequestRecord]:
    """The requests the run's summary counts (``lpenv.metrics.measured``: arriving at or
    after its warm-up's end)."""
    start = run.get("warmup_s") or 0.0
    return [r for r in recs if measured(r.arrival_time, start)]


def read_requests(run_dir: str | Path) -> list[RequestRecord]:
    """A run's requests as ``RequestRecord`` (from lpenv-eval's requests.csv); [] if absent."""
    path = Path(run_dir) / "requests.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [RequestRecord(row["request_id"], float(row["arrival_s"]),
                              int(row["prompt_tokens"]), int(row["output_tokens"]),
                              [float(t) for t in row["token_times_s"].split()],
                              rejected=row["rejected"] == "1")
                for row in csv.DictReader(f)]


def scenario_of(run: dict) -> tuple:
    return tuple(run.get(k) for k in SCENARIO_KEYS)


def engines_of(by_rate_or_policy: dict) -> str:
    """The engines whose runs a line (rate -> runs) or a scenario (line -> rate -> runs)
    holds, in words."""
    values = list(by_rate_or_policy.values())
    lines = values if values and isinstance(values[0], dict) else [by_rate_or_policy]
    return " and ".join(sorted({str(run.get("engine")) for line in lines
                                for runs in line.values() for run in runs}))


def scenario_title(scenario: tuple, by_policy: dict) -> str:
    s = dict(zip(SCENARIO_KEYS, scenario))
    return (f"{s['workload']}, {s['model']} ({engines_of(by_policy)}, {s['latency']}); "
            f"SLO TTFT {s['ttft_slo_s']} s, TBT {_ms(s['tbt_slo_s'])} ms")


def _ms(seconds) -> str:
    return "?" if seconds is None else f"{seconds * 1e3:g}"


# ---- aggregating -----------------------------------------------------------------------------
def curves(runs: Sequence[dict]) -> dict[tuple, dict[str, dict[float, list[dict]]]]:
    """scenario -> line -> rate -> runs (seeds)."""
    out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for run in runs:
        out[scenario_of(run)][run["line"]][float(run["rate"])].append(run)
    return out


def mean_of(runs: Sequence[dict], key: str) -> float:
    values = [r[key] for r in runs if r.get(key) is not None]
    return float(np.mean(values)) if values else math.nan


def goodput_rows(runs: Sequence[dict], target: float = TARGET) -> list[dict]:
    rows = []
    for scenario, by_policy in curves(runs).items():
        for policy, by_rate in sorted(by_policy.items()):
            att = {rate: mean_of(rs, "slo_attainment") for rate, rs in sorted(by_rate.items())}
            rows.append({**dict(zip(SCENARIO_KEYS, scenario)), "engine": engines_of(by_rate),
                         "policy": policy,
                         "goodput_rate": goodput(att, target), "target": target,
                         "rates": " ".join(f"{r:g}" for r in att),
                         "attainment": " ".join(f"{a:.3f}" for a in att.values()),
                         # (the table rounds these, not the CSV's three decimals)
                         "attainment_values": list(att.values())})
    return rows


# ---- writing ---------------------------------------------------------------------------------
def write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    return plt


# Each policy's line, marker and fill differ (the i-th policy in name order takes the i-th):
# policies that attain alike draw on top of each other, and each stays visible.
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = (("o", 6, None), ("s", 9, "none"), ("^", 10, "none"), ("D", 7, None),
           ("v", 10, "none"), ("P", 8, None))


def series_style(i: int, markers: bool = True) -> dict:
    """Matplotlib keywords for the ``i``-th series of a panel."""
    style = {"ls": LINE_STYLES[i % len(LINE_STYLES)]}
    if markers:
        marker, size, fill = MARKERS[i % len(MARKERS)]
        style.update(marker=marker, ms=size, **({"mfc": fill} if fill else {}))
    return style


def plot_attainment(runs: Sequence[dict], path: Path, target: float = TARGET) -> None:
    plt = _pyplot()
    groups = curves(runs)
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.5), squeeze=False)
    for ax, (scenario, by_policy) in zip(axes[0], groups.items()):
        for i, (policy, by_rate) in enumerate(sorted(by_policy.items())):
            rates = sorted(by_rate)
            ax.plot(rates, [100 * mean_of(by_rate[r], "slo_attainment") for r in rates],
                    label=policy, **series_style(i))
        ax.axhline(100 * target, color="grey", ls="--", lw=1, label=f"{target:.0%} target")
        ax.set(xlabel="request rate (req/s)", ylabel="SLO attainment (%)", ylim=(-3, 103),
               title=scenario_title(scenario, by_policy))
        _finish_panel(ax, legend_size=8)
    _save(plt, fig, path)


def _finish_panel(ax, legend_size: int) -> None:
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cdf(ax, values: np.ndarray, label: str, points: int = 2000, **style) -> None:
    """The empirical CDF, drawn through at most ``points`` of its own steps (both ends kept):
    a paper panel's TBT gaps run to millions, which a 500-pixel axis cannot show and
    matplotlib draws for a minute."""
    xs = np.sort(values[np.isfinite(values)])
    if not xs.size:
        return
    at = np.unique(np.linspace(0, xs.size - 1, min(points, xs.size)).round().astype(int))
    ax.step(xs[at], (at + 1) / xs.size, where="post", label=label, **style)


def plot_cdfs(runs: Sequence[dict], ttft_path: Path, tbt_path: Path,
              max_rates: int = 4) -> None:
    """TTFT and TBT-gap CDFs: rows are scenarios, columns rates (at most ``max_rates``)."""
    plt = _pyplot()
    groups = curves(runs)
    panels = []
    for scenario, by_policy in groups.items():
        rates = sorted({rate for by_rate in by_policy.values() for rate in by_rate})
        if len(rates) > max_rates:  # spread over the range, keeping both ends
            picks = np.linspace(0, len(rates) - 1, max_rates).round().astype(int)
            rates = [rates[i] for i in picks]
        panels.append((scenario, by_policy, rates))
    ncols = max(len(p[2]) for p in panels)
    requests_of = functools.cache(read_requests)  # each run's, read once for both plots
    for what, path in (("ttft", ttft_path), ("tbt", tbt_path)):
        fig, axes = plt.subplots(len(panels), ncols, figsize=(4.5 * ncols, 3.6 * len(panels)),
                                 squeeze=False)
        for row, (scenario, by_policy, rates) in enumerate(panels):
            s = dict(zip(SCENARIO_KEYS, scenario))
            for col in range(ncols):
                ax = axes[row][col]
                if col >= len(rates):
                    ax.set_visible(False)
                    continue
                for i, (policy, by_rate) in enumerate(sorted(by_policy.items())):
                    recs = [rec for run in by_rate.get(rates[col], [])
                            for rec in counted(run, requests_of(run["run_dir"]))]
                    if what == "ttft":
                        values = np.array([r.ttft for r in recs if r.ttft is not None])
                    else:
                        values = tbt_gaps_of(recs)[0] * 1e3
                    _cdf(ax, values, policy, **series_style(i, markers=False))
                slo = s["ttft_slo_s"] if what == "ttft" else (s["tbt_slo_s"] or 0) * 1e3
                if slo:
                    ax.axvline(slo, color="grey", ls="--", lw=1, label="SLO")
                ax.set(xlabel="TTFT (s)" if what == "ttft" else "gap between tokens (ms)",
                       ylabel="fraction of requests" if what == "ttft" else "fraction of gaps",
                       title=f"{s['workload']}, {s['model']} @ {rates[col]:g} req/s")
                if what == "ttft":
                    ax.set_xscale("log")
                _finish_panel(ax, legend_size=7)
        _save(plt, fig, path)


# ---- tables ----------------------------------------------------------------------------------
def _fmt(value, scale: float = 1.0, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value * scale, spec)


def format_tables(runs: Sequence[dict], rows: Sequence[dict], target: float = TARGET) -> str:
    lines = []
    width = max([24, *(len(r["line"]) + 2 for r in runs)])
    for scenario, by_policy in curves(runs).items():
        lines.append(scenario_title(scenario, by_policy))
        scales = {r.get("latency_scale", 1) for r in runs if scenario_of(r) == scenario}
        if scales != {1}:
            lines.append(f"(measured x{', '.join(f'{x:.3g}' for x in sorted(scales))}: each "
                         "measured latency times that, backend.latency_scale; make run's "
                         "undoes this machine's speed against cpu-generic, in speed.json)")
        head = (f"{'policy':<{width}}{'rate':>6}{'runs':>6}{'SLO att.':>10}{'TTFT att.':>10}"
                f"{'TBT att.':>10}{'TTFT p90 s':>11}{'TBT p99 ms':>11}{'E2E s':>8}{'mJ/tok':>8}"
                f"{'expert GB':>10}{'wall s':>8}")
        lines += [head, "-" * len(head)]
        for policy, by_rate in sorted(by_policy.items()):
            for rate, rs in sorted(by_rate.items()):
                m = {k: mean_of(rs, k) for k in ("slo_attainment", "ttft_attainment",
                                                  "tbt_attainment", "ttft_p90_s", "tbt_p99_s",
                                                  "e2e_mean_s", "energy_per_token_j",
                                                  "expert_bytes", "wall_time_s")}
                lines.append(
                    f"{policy:<{width}}{rate:>6g}{len(rs):>6}"
                    f"{_fmt(m['slo_attainment'], 100, '.0f'):>9}%"
                    f"{_fmt(m['ttft_attainment'], 100, '.0f'):>9}%"
                    f"{_fmt(m['tbt_attainment'], 100, '.0f'):>9}%"
                    f"{_fmt(m['ttft_p90_s']):>11}{_fmt(m['tbt_p99_s'], 1e3):>11}"
                    f"{_fmt(m['e2e_mean_s']):>8}{_fmt(m['energy_per_token_j'], 1e3):>8}"
                    f"{_fmt(m['expert_bytes'], 1e-9):>10}{_fmt(m['wall_time_s'], 1, '.1f'):>8}")
        lines.append("")
    lines.append(f"goodput: highest request rate with SLO attainment >= {target:.0%} (and at "
                 "every lower rate)")
    head = (f"{'workload':<10}{'model':<16}{'policy':<{width}}{'goodput req/s':>14}  "
            "attainment by rate")
    lines += [head, "-" * len(head)]
    for r in rows:
        by_rate = ", ".join(f"{rate}: {a:.0%}" for rate, a in
                            zip(r["rates"].split(), r["attainment_values"]))
        gp = "none" if r["goodput_rate"] is None else f"{r['goodput_rate']:g}"
        lines.append(f"{r['workload']!s:<10}{r['model']!s:<16}{r['policy']:<{width}}{gp:>14}  "
                     f"{by_rate}")
    return "\n".join(lines)


def report(folders: Sequence[Path], out: Path, target: float = TARGET) -> dict:
    runs = load_runs(folders)
    if not runs:
        raise SystemExit(f"lpenv-sweep-report: no lpenv-eval summary.json under "
                         f"{', '.join(map(str, folders))}")
    out.mkdir(parents=True, exist_ok=True)
    rows = goodput_rows(runs, target)
    write_csv(out / "runs.csv", runs, RUN_COLUMNS)
    write_csv(out / "goodput.csv", rows, (*SCENARIO_KEYS, "engine", "policy", "goodput_rate",
                                          "target", "rates", "attainment"))
    plot_attainment(runs, out / "attainment_vs_rate.png", target)
    plot_cdfs(runs, out / "ttft_cdf.png", out / "tbt_cdf.png")
    files = [out / n for n in ("attainment_vs_rate.png", "ttft_cdf.png", "tbt_cdf.png",
                               "goodput.csv", "runs.csv")]
    return {"runs": runs, "goodput": rows, "files": files,
            "table": format_tables(runs, rows, target)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lpenv-sweep-report", description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="multirun folder(s) of lpenv-eval")
    p.add_argument("--out", type=Path, default=None, help="default: the first folder")
    p.add_argument("--target", type=float, default=TARGET, help="attainment target (0-1)")
    args = p.parse_args(argv)
    if not 0 < args.target <= 1:
        p.error("--target must be in (0, 1]")
    if args.out is not None:  # the nearest existing path must be a folder to write into
        there = next((q for q in (args.out, *args.out.parents) if q.exists()), None)
        if there is not None and not there.is_dir():
            p.error(f"--out {args.out}: {there} is a file, not a folder")
    result = report(args.folders, args.out or args.folders[0], args.target)
    print(result["table"])
    print("wrote " + ", ".join(str(f) for f in result["files"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
