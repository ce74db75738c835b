"""Hardware profiles: names, tensor parallel, calibrated files, and the NVML meter's steps."""

from __future__ import annotations

import sys
import types
from dataclasses import replace

import pytest

from engine_adapter.energy import NvmlEnergy, energy_meter
from engine_adapter.errors import ConfigError
from engine_adapter.hardware import (
    DATASHEET_PROFILES,
    HardwareProfile,
    resolve_profile,
    write_profile,
)


def test_tensor_parallel_suffix_divides_work_and_multiplies_static_power():
    one, two = resolve_profile("h200"), resolve_profile("h200-tp2")
    assert two.tensor_parallel == 2 and two.name == "h200-tp2"
    assert two.compute_time(1e12, 1e12, 1e12) == pytest.approx(one.compute_time(1e12, 1e12,
                                                                                 1e12) / 2)
    assert two.energy.static_w == 2 * one.energy.static_w
    assert energy_meter("sim:h100-sxm-tp2").source == "modeled:h100-sxm-tp2"
    with pytest.raises(ConfigError, match="no link"):
        resolve_profile("cpu-generic-tp2")


def test_unknown_and_uncalibrated_profiles_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("LPENV_PROFILE_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="lpenv-calibrate"):
        resolve_profile("cpu-auto")
    with pytest.raises(ConfigError, match="unknown hardware profile 'tpu'.*h200"):
        resolve_profile("tpu")


def test_calibrated_profile_file_round_trips(tmp_path, monkeypatch):
    monkeypatch.setenv("LPENV_PROFILE_DIR", str(tmp_path))
    mine = replace(DATASHEET_PROFILES["cpu-generic"], name="cpu-auto", kv_efficiency=0.5,
                   source="calibrated")
    path = write_profile(mine)
    assert path == tmp_path / "cpu-auto.json"
    assert resolve_profile("cpu-auto") == mine
    assert resolve_profile(str(path)) == mine
    with pytest.raises(ConfigError, match="unknown fields"):
        HardwareProfile.from_json({"name": "x", "peak_flop": 1})


def test_nvml_meter_charges_every_iteration_between_counter_steps(monkeypatch):
    """NVML's energy counter advances in steps: iterations inside a step still cost energy."""
    clock = {"t": 0.0}
    counter = {"mj": 1_000_000}
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetTotalEnergyConsumption=lambda h: counter["mj"],
        nvmlDeviceGetPowerUsage=lambda h: 200_000)  # 200 W, in mW
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr("engine_adapter.energy.time.perf_counter", lambda: clock["t"])
    meter = NvmlEnergy()
    total = 0.0
    for i in range(40):  # 10 ms iterations at 300 W; the counter steps every 100 ms
        meter.start()
        clock["t"] += 0.010
        if (i + 1) % 10 == 0:
            counter["mj"] += 30_000
        joules = meter.stop(0.010, 0, 0)
        assert joules > 0
        total += joules
    assert total == pytest.approx(0.4 * 300, rel=0.25)  # first step priced at NVML's 200 W
