"""A calibration record: everything ``lpenv-calibrate`` measured on a device, in JSON.

Measuring needs the device (a GPU is often lent for minutes); fitting does not. The record
keeps each iteration's plan (what ran through which layers), the distinct experts its routers
loaded, its measured latency and the peak probe's reading before it (``peak_probe``), the
device's peaks, the held-out episodes' summaries and, where the device has an energy counter,
the energy spans (``energy_fit``), so that ``lpenv-calibrate --refit RECORD`` fits and reports
anywhere, as often as wanted.

Plans are stored by their shape alone: token ids and block tables do not enter the cost
model. JSON, not pickle: a record from elsewhere is data, never code.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from engine_adapter.calibration import Sample
from engine_adapter.energy_fit import EnergySpan, spans_from_json
from engine_adapter.errors import ConfigError
from engine_adapter.plan import IterationPlan, Segment, StageWork

FORMAT = "lpenv-calibration-record/1"


def _segments_json(segments: Sequence[Segment]) -> list:
    return [[s.request_id, s.start, s.length, int(s.sample)] for s in segments]


def _segments(rows: list) -> tuple[Segment, ...]:
    return tuple(Segment(rid, start, length, (), bool(sample))
                 for rid, start, length, sample in rows)


def plan_json(plan: IterationPlan) -> dict:
    return {"iteration": plan.iteration, "mode": plan.mode, "num_layers": plan.num_layers,
            "decode": _segments_json(plan.decode),
            "stages": [[st.batch_id, st.stage, st.num_groups, st.layer_start, st.layer_end,
                        _segments_json(st.segments)] for st in plan.stages]}


def plan_from_json(d: dict) -> IterationPlan:
    return IterationPlan(
        d["iteration"], d["mode"], d["num_layers"], _segments(d["decode"]),
        tuple(StageWork(b, stage, g, lo, hi, _segments(segs))
              for b, stage, g, lo, hi, segs in d["stages"]))


def samples_json(samples: Sequence[Sample]) -> list:
    return [{"plan": plan_json(s.plan), "distinct_experts": list(s.distinct_experts),
             "measured_s": s.measured_s, **({"probe": list(s.probe)} if s.probe else {})}
            for s in samples]


def samples_from_json(rows: list) -> list[Sample]:
    # (records from before the peak probe have no "probe")
    return [Sample(plan_from_json(r["plan"]), tuple(r["distinct_experts"]), r["measured_s"],
                   tuple(r["probe"]) if r.get("probe") else None) for r in rows]


@dataclass
class CalibrationRecord:
    """What one ``lpenv-calibrate`` run measured."""

    model: str
    device: str  # the torch device type: cpu, cuda
    dtype: str
    source: str  # where and when, for the profile's ``source``
    peaks: dict  # measured peak FLOP/s and bandwidth, at the start and at the end
    grid: dict
    seed: int
    grid_samples: list[Sample]
    # per held-out policy label: the real engine's episode summary and its iterations
    held_out: dict[str, dict] = field(default_factory=dict)
    # Sustained loads measured by the device's energy counter (none without one), and which.
    energy_spans: list[EnergySpan] = field(default_factory=list)
    energy_counter: str | None = None
    # The torch threads the engine ran with (None in records from before it was kept).
    threads: int | None = None
    # How many times as long as the held-out workload's reference machine the device ran the
    # grid's first pass: the held-out episodes ran at that pace (None in older records: they
    # ran at the reference's).
    held_out_pace: float | None = None

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {"format": FORMAT, "model": self.model, "device": self.device,
                "dtype": self.dtype, "source": self.source, "peaks": self.peaks,
                "grid": self.grid, "seed": self.seed,
                "grid_samples": samples_json(self.grid_samples),
                "held_out": {label: {"summary": h["summary"],
                                     "samples": samples_json(h["samples"])}
                             for label, h in self.held_out.items()},
                "energy_counter": self.energy_counter,
                "energy_spans": [s.to_json() for s in self.energy_spans],
                "threads": self.threads, "held_out_pace": self.held_out_pace}
        text = json.dumps(body) + "\n"
        if path.suffix == ".gz":  # records kept in a repository are better compressed
            path.write_bytes(gzip.compress(text.encode()))
        else:
            path.write_text(text)
        return path

    @classmethod
    def read(cls, path: str | Path) -> CalibrationRecord:
        path = Path(path)
        try:
            data = path.read_bytes()
            body = json.loads(gzip.decompress(data) if path.suffix == ".gz" else data)
        except (OSError, ValueError, EOFError) as exc:
            raise ConfigError(f"cannot read calibration record {path}: {exc}") from exc
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise ConfigError(f"{path} is not a calibration record ({FORMAT}): "
                              "lpenv-calibrate writes one beside each report")
        return cls(body["model"], body["device"], body["dtype"], body["source"],
                   body["peaks"], body["grid"], body["seed"],
                   samples_from_json(body["grid_samples"]),
                   {label: {"summary": h["summary"],
                            "samples": samples_from_json(h["samples"])}
                    for label, h in body["held_out"].items()},
                   spans_from_json(body.get("energy_spans", [])), body.get("energy_counter"),
                   body.get("threads"), body.get("held_out_pace"))
