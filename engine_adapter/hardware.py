"""Hardware profiles: what the cost model prices an iteration with, and its energy constants.

A profile holds a device's peak dense FLOP/s and memory bandwidth (datasheet or measured), the
share of each that each kind of work reaches (efficiencies), fixed overheads per iteration, per
layer run and per distinct expert loaded, tensor parallelism and the link between devices,
and the energy model (``engine_adapter.energy``).

Names ``hardware=`` accepts:

* a datasheet profile: ``cpu-generic``, ``h100-sxm``, ``h200``, ``a100-80g``;
* any of them with ``-tpN`` appended: N devices in tensor parallel (``h100-sxm-tp2`` is the
  paper's machine), static power N times;
* a calibrated profile written by ``lpenv-calibrate``: ``cpu-auto`` (this machine's CPU) or any
  ``--name``, read from ``$LPENV_PROFILE_DIR`` (default ``~/.cache/lpenv/profiles``);
* a path to such a ``.json`` file.

GPU efficiencies: the MoE layers' two (expert FLOPs at 20% of the BF16 peak, expert weights
streamed at 45% of HBM bandwidth) are read off the paper's measured MoE kernel time (see
``EXPERT_EFFICIENCY``); the rest are assumptions, not measurements: 60% of dense BF16 peak for
the other GEMMs (cuBLAS on large shapes reaches 70-80%; serving shapes are smaller), 50% for
attention (FlashAttention-3 reports 75% of H100 peak in BF16 forward at long sequences; decode
and short prefills reach less), 80% of HBM bandwidth for KV streaming (STREAM-like copies reach
85-90%). All-reduce: 60% of the per-direction NVLink bandwidth, 10 us per call.
Overheads are guesses of kernel-launch cost (about 5 us per launch, a few per layer); none per
distinct expert (the expert efficiencies hold it: the paper measured a fused kernel).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from engine_adapter.compiled import picklable
from engine_adapter.energy import ENERGY_MODELS, EnergyModel
from engine_adapter.errors import ConfigError


class ProfileExtrapolation(UserWarning):
    """A calibrated profile used for another model than the one it was fitted on."""


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    peak_flops: float  # dense FLOP/s of one device in the engine's dtype
    bandwidth: float  # bytes/s of one device's memory
    iteration_overhead_s: float
    layer_overhead_s: float  # per layer run in an iteration
    expert_overhead_s: float  # per distinct expert per MoE layer invocation
    row_overhead_s: float = 0.0  # per row (token) per iteration: host-side bookkeeping
    attention_call_overhead_s: float = 0.0  # per attention call per layer
    matmul_efficiency: float = 1.0  # projections, router, dense MLPs, LM head
    expert_efficiency: float = 1.0  # expert FFNs
    attention_efficiency: float = 1.0  # QK^T and PV
    weight_efficiency: float = 1.0  # streaming weights
    kv_efficiency: float = 1.0  # reading and writing the KV cache
    overlap: bool = True  # compute and memory overlap (roofline max) or not (their sum)
    # Plain attention (the torch engine): decode batches padded to the longest context, masked
    # segments computed in full. False: fused paged kernels doing exactly the attended keys.
    padded_attention: bool = False
    # A fitted efficiency curve for expert FFNs, on top of their per-FLOP cost: with m rows
    # per distinct expert, each expert adds sum_j expert_curve_s[j] * min(m, knot_j) seconds.
    # Concave and piecewise linear in m: small per-expert matmuls run below the peak rate.
    expert_curve_knots: tuple[float, ...] = ()
    expert_curve_s: tuple[float, ...] = ()
    # Spread of measured iteration latency around the prediction (sd of log(measured /
    # predicted) on the calibration grid); the simulator can draw it. Datasheet profiles: 0.
    latency_noise_sd: float = 0.0
    # Tensor parallelism: each of ``tensor_parallel`` devices does 1/tp of a layer's FLOPs and
    # bytes, then two all-reduces per layer (after attention and after the MLP) move the rows'
    # hidden states over the link (ring all-reduce: 2 (tp - 1) / tp of the data each).
    tensor_parallel: int = 1
    link_bandwidth: float = 0.0  # bytes/s per device per direction
    allreduce_latency_s: float = 0.0
    # Bytes of one device's memory (datasheet, or measured by lpenv-calibrate on a GPU):
    # what the model's weights and KV cache must fit in (``engine_adapter.device_memory``).
    # 0: not checked (the CPU profiles: the engine's tensors live in host memory).
    memory_bytes: float = 0.0
    energy: EnergyModel = field(default_factory=lambda: ENERGY_MODELS["cpu-generic"])
    source: str = "datasheet"
    # The model a calibrated profile was fitted on ("": a datasheet profile, for any model):
    # its fitted efficiencies and overheads hold for that model's shapes.
    fitted_model: str = ""

    def __post_init__(self) -> None:
        if len(self.expert_curve_knots) != len(self.expert_curve_s):
            raise ConfigError("hardware profile: expert_curve_knots and expert_curve_s must have "
                              "the same length")

    def expert_curve_time(self, distinct: float, rows_per_expert: float) -> float:
        return distinct * sum(s * min(rows_per_expert, k)
                              for k, s in zip(self.expert_curve_knots, self.expert_curve_s))

    def compute_time(self, dense_flops: float, expert_flops: float, attention_flops: float
                     ) -> float:
        return (dense_flops / self.matmul_efficiency + expert_flops / self.expert_efficiency
                + attention_flops / self.attention_efficiency) / (
                    self.peak_flops * self.tensor_parallel)

    def memory_time(self, weight_bytes: float, kv_bytes: float) -> float:
        return (weight_bytes / self.weight_efficiency + kv_bytes / self.kv_efficiency) / (
            self.bandwidth * self.tensor_parallel)

    def allreduce_time(self, rows: int, hidden: int, dtype_bytes: int) -> float:
        tp = self.tensor_parallel
        if tp == 1 or rows == 0:
            return 0.0
        moved = 2 * (tp - 1) / tp * rows * hidden * dtype_bytes
        return 2 * (self.allreduce_latency_s + moved / self.link_bandwidth)

    def with_tensor_parallel(self, tp: int) -> HardwareProfile:
        if tp < 1:
            raise ConfigError(f"tensor parallel degree must be at least 1, got {tp}")
        if tp > 1 and self.link_bandwidth <= 0:
            raise ConfigError(f"profile {self.name!r} has no link between devices: it cannot "
                              "run tensor parallel")
        energy = replace(self.energy, name=f"{self.energy.name}-tp{tp}",
                         static_w=self.energy.static_w * tp)
        return replace(self, name=f"{self.name}-tp{tp}", tensor_parallel=tp, energy=energy)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> HardwareProfile:
        data = dict(data)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"hardware profile: unknown fields {unknown}")
        data["energy"] = EnergyModel(**data.get("energy", asdict(ENERGY_MODELS["cpu-generic"])))
        for key in ("expert_curve_knots", "expert_curve_s"):
            data[key] = tuple(data.get(key, ()))
        return cls(**data)


def _gpu(name: str, peak: float, bandwidth: float, link: float, memory: float, energy: str
         ) -> HardwareProfile:
    return HardwareProfile(
        # No cost per distinct expert: the expert efficiencies below are read off the paper's
        # measured MoE kernel time, which holds whatever each expert costs (a fused kernel
        # launches once per layer); 2 us per expert on top counted 197 of those 312 ms again.
        name, peak, bandwidth, iteration_overhead_s=2e-4, layer_overhead_s=1e-5,
        expert_overhead_s=0.0, matmul_efficiency=0.6, expert_efficiency=EXPERT_EFFICIENCY,
        attention_efficiency=0.5, weight_efficiency=EXPERT_WEIGHT_EFFICIENCY, kv_efficiency=0.8,
        link_bandwidth=0.6 * link, allreduce_latency_s=10e-6, memory_bytes=memory,
        energy=ENERGY_MODELS[energy])


# The MoE layers' efficiencies come from the paper's own kernel timing (PAPER.md: Qwen3-30B-A3B
# on 2 x H100, one 8,192-token prompt, MoE kernel time 312 ms in 512-token chunks and 76 ms in
# one pass). Per layer and device: 16 chunks x 48 layers -> 0.41 ms to stream 604 MB of experts
# (45% of 3.35 TB/s), and 1.58 ms for 310 GFLOP in one pass (20% of 989 TFLOP/s). The same
# fused-MoE kernels run on the other GPUs, so the same shares are assumed there.
EXPERT_EFFICIENCY = 0.20
EXPERT_WEIGHT_EFFICIENCY = 0.45

DATASHEET_PROFILES = {
    # Two cores of a recent Xeon in float32, read off qwen3-moe-cpu runs here before
    # calibration existed: a 2,048-token layer-wide prefill reaches ~170 GFLOP/s; 128-token
    # chunks re-reading all experts add ~15 GB/s worth of time on top (no overlap).
    # ``lpenv-calibrate`` measures and fits this machine instead (``cpu-auto``).
    "cpu-generic": HardwareProfile("cpu-generic", 170e9, 15e9, 1e-3, 2e-4, 3e-5,
                                   overlap=False),
    # NVIDIA H100 SXM5 datasheet: 989 TFLOP/s dense BF16, 80 GB of HBM3 at 3.35 TB/s, NVLink
    # 4 at 900 GB/s both directions together (450 GB/s each way).
    "h100-sxm": _gpu("h100-sxm", 989e12, 3.35e12, 450e9, 80e9, "h100-sxm"),
    # NVIDIA H200 SXM datasheet: the H100's compute (989 TFLOP/s dense BF16), 141 GB of HBM3e
    # at 4.8 TB/s, the same NVLink 4.
    "h200": _gpu("h200", 989e12, 4.8e12, 450e9, 141e9, "h200"),
    # NVIDIA A100 80GB SXM datasheet: 312 TFLOP/s dense BF16, 80 GB of HBM2e at 2,039 GB/s,
    # NVLink 3 at 600 GB/s both directions together (300 GB/s each way).
    "a100-80g": _gpu("a100-80g", 312e12, 2.039e12, 300e9, 80e9, "a100-80g"),
}
CALIBRATED_DEFAULT = "cpu-auto"
_TP = re.compile(r"^(?P<base>.+)-tp(?P<tp>\d+)$")


def profile_dir() -> Path:
    """Where ``lpenv-calibrate`` writes profiles and ``hardware=`` finds them."""
    return Path(os.environ.get("LPENV_PROFILE_DIR", Path.home() / ".cache" / "lpenv" / "profiles"))


def profile_path(name: str) -> Path:
    return profile_dir() / f"{name}.json"


def known_profiles() -> list[str]:
    found = sorted(p.stem for p in profile_dir().glob("*.json")) if profile_dir().is_dir() else []
    return sorted(set(DATASHEET_PROFILES) | set(found) | {CALIBRATED_DEFAULT})


@lru_cache(maxsize=64)
def _load_file(path: str, mtime: float) -> HardwareProfile:
    try:
        return HardwareProfile.from_json(json.loads(Path(path).read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ConfigError(f"hardware profile {path}: not a profile file ({exc})") from None


def resolve_profile(name: str | HardwareProfile) -> HardwareProfile:
    """The profile ``name`` denotes (see the module docstring for the forms)."""
    if isinstance(name, HardwareProfile):
        return name
    if name in DATASHEET_PROFILES:
        return DATASHEET_PROFILES[name]
    path = Path(name) if name.endswith(".json") else profile_path(name)
    if path.is_file():
        return _load_file(str(path), path.stat().st_mtime)
    match = _TP.match(name)
    if match:
        return resolve_profile(match["base"]).with_tensor_parallel(int(match["tp"]))
    if name == CALIBRATED_DEFAULT:
        raise ConfigError(
            f"hardware profile {name!r} is measured on this machine and none is there yet: run "
            f"`lpenv-calibrate` (a few minutes; it writes {path})")
    raise ConfigError(f"unknown hardware profile {name!r}: known are {known_profiles()}, any "
                      "of them with -tpN, or a profile .json file")


def write_profile(profile: HardwareProfile, path: Path | None = None) -> Path:
    path = path or profile_path(profile.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.to_json(), indent=2) + "\n")
    return path

picklable(HardwareProfile)
