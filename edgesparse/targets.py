"""Crossover tables per device: what `bench kernels --device` writes and `export --target` reads.

A table is runtime_kernels/crossover.json's format plus where it was measured: the device spec,
its machine (uname -m), CPU, the thread count, and whether the timings were emulated (then they
are flagged and never a speed: the flow and the file are what such a table shows). It is named
after the device: CACHE/crossover/<device>.json ($EDGESPARSE_CACHE).

`export --target TABLE.json` decides sparse or dense with that table; `--target URL` reads the
device's architecture, finds the table measured on that device and refuses a table measured on
another architecture.
"""

from __future__ import annotations

import re
from pathlib import Path

from edgesparse.errors import EdgesparseError


def table_path(device: str) -> Path:
    """Where the crossover table measured on `device` lives (named after the device)."""
    from edgesparse._io import cache_dir

    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", device.split("?", 1)[0].replace("://", "-")).strip("_")
    return cache_dir() / "crossover" / f"{slug}.json"


def measure_local(device: str, quick: bool, threads: int) -> dict:
    """The kernel sweep on this machine (bench_kernels: ours and dense XNNPACK in this process)
    as a crossover table recording the machine, CPU and thread count."""
    import platform

    from edgesparse.bench import bench_kernels, crossover
    from edgesparse.devices import parse_device

    transport = parse_device(device)
    if transport.remote:
        raise EdgesparseError(f"crossovers are measured here only for now, not on {device} (the on-device kernel-bench "
                              "mode of the C++ runner is not built yet)",
                              hint="run `edgesparse bench kernels --device local` on the board itself")
    state = transport.info()
    rows = bench_kernels(quick=quick, threads=threads)
    if not rows:
        raise EdgesparseError("no benchmark cases ran")
    return {"device": device, "machine": state.get("machine", platform.machine()), "cpu": state.get("cpu", ""),
            "cores": state.get("cores"), "threads": threads, "isa": rows[0]["isa"], "emulated": False, "quick": quick,
            "table": crossover(rows)}


def resolve(target: str) -> tuple[Path, str]:
    """`export --target`: (the table's path, the name layers' reasons give it). A .json path is
    used as is; a device spec gives the table measured on it, checked against its architecture."""
    from edgesparse.runtime_kernels.crossover import check_architecture, load_table

    if target.endswith(".json") or Path(target).is_file():
        path = Path(target)
        load_table(path)  # one-line error for a missing or malformed file
        return path, path.name
    from edgesparse.devices import parse_device

    transport = parse_device(target)
    path = table_path(target)
    if not path.is_file():
        raise EdgesparseError(f"no crossover table measured on {target} ({path})",
                              hint=f"edgesparse bench kernels --device {target} --quick")
    machine = transport.info().get("machine", "")
    check_architecture(load_table(path), path.name, machine)
    return path, path.name
