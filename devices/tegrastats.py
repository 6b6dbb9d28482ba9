"""Jetson telemetry: parse `tegrastats` lines (L4T r32 to r36) and turn the board's input rail into
energy per inference.

    11-22-2026 11:20:01 RAM 3105/7620MB (lfb 12x4MB) SWAP 0/3810MB (cached 0MB)
      CPU [12%@1510,3%@1510,off] GR3D_FREQ 0% cpu@48.5C gpu@47.093C tj@48.5C
      VDD_IN 5104mW/4987mW VDD_CPU_GPU_CV 842mW/801mW VDD_SOC 1457mW/1440mW

Rails are `NAME instant/average` (mW; r32 prints no unit); sensors reading -256C are unpopulated
and dropped; fields this parser does not know are ignored.
"""

from __future__ import annotations

import re
import statistics

_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?\b")
_TEMP = re.compile(r"\b([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C\b")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_GPU = re.compile(r"\bGR3D_FREQ (\d+)%")

# the whole board's input, newest name first (Orin Nano/NX, AGX Orin, r32 Nano/TX2)
INPUT_RAILS = ("VDD_IN", "VIN_SYS_5V0", "POM_5V_IN")


def parse_line(line: str) -> dict | None:
    """One tegrastats line as a dict, or None if it is not one."""
    ram = _RAM.search(line)
    if not ram:
        return None
    sample: dict = {"ram_used_mb": int(ram[1]), "ram_total_mb": int(ram[2])}
    if swap := _SWAP.search(line):
        sample["swap_used_mb"], sample["swap_total_mb"] = int(swap[1]), int(swap[2])
    if cpu := _CPU.search(line):
        cores = []
        for field in cpu[1].split(","):
            load, _, mhz = field.strip().partition("%@")
            cores.append(None if field.strip() == "off" or not mhz.isdigit() else {"load_pct": int(load), "mhz": int(mhz)})
        sample["cpu"] = cores
    if gpu := _GPU.search(line):
        sample["gpu_load_pct"] = int(gpu[1])
    temps = {name: float(value) for name, value in _TEMP.findall(line) if float(value) > -256}
    if temps:
        sample["temps_c"] = temps
    rails = {name: {"mw": int(now), "avg_mw": int(avg)} for name, now, avg in _RAIL.findall(line)
             if name not in ("RAM", "SWAP", "NC")}
    if rails:
        sample["rails"] = rails
    return sample


def energy_per_inference(lines: list[str], latency_ms: float) -> dict | None:
    """Mean board input power over the samples times the mean latency: the board's energy per
    inference (static power included: it is what the battery pays). None without an input rail."""
    samples = [s for s in map(parse_line, lines) if s and "rails" in s]
    for rail in INPUT_RAILS:
        powers = [s["rails"][rail]["mw"] for s in samples if rail in s["rails"]]
        if powers:
            mean_mw = statistics.fmean(powers)
            return {"rail": rail, "samples": len(powers), "mean_power_mw": mean_mw,
                    "energy_per_inference_mj": mean_mw * latency_ms / 1000}
    return None
