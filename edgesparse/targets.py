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


def device_cases(quick: bool) -> list:
    """The weight-sparse fp32 cases a device measures (activation-sparse MLPs have no crossover)."""
    from edgesparse.bench import Case, cases

    if quick:  # a few minutes even under emulation: one linear and one 1x1 conv shape, two patterns
        return [Case(op, i, o, r, p, s) for op, i, o, r in (("linear", 1024, 4096, 1), ("conv1x1", 256, 512, 14))
                for p in ("block:4x1", "block:1x4") for s in (0.7, 0.9)]
    return [c for c in cases(False) if c.op != "mlp"]


def measure_remote(transport, device: str, quick: bool) -> dict:
    """The kernel sweep on a device: one-layer .pte files (ours, and each shape lowered dense to
    XNNPACK) built here, pushed with edgesparse_kernel_bench and its libraries, timed there in one
    process in interleaved rounds; rows as bench_kernels gives them, then the crossover table."""
    import statistics
    import tempfile

    from edgesparse.bench import _layer, _sparse, crossover
    from edgesparse.converters.executorch import lower
    from edgesparse.devices.remote import looks_emulated, runner_bundle

    state = transport.info()
    machine = state.get("machine", "unknown")
    bundle = runner_bundle(machine, program="edgesparse_kernel_bench")
    all_cases = device_cases(quick)
    rounds, runs = (3, 20) if quick else (5, 50)
    with tempfile.TemporaryDirectory() as tmp:
        names, dense, sparse = [], {}, []
        for index, case in enumerate(all_cases):
            layer, x = _layer(case), case.example()
            shape = (case.op, case.inp, case.out, case.rows)
            if shape not in dense:
                dense[shape] = f"dense{len(dense)}.pte"
                (Path(tmp) / dense[shape]).write_bytes(lower(layer, (x,)).buffer)
                names.append(dense[shape])
            sparse.append(f"sparse{index}.pte")
            (Path(tmp) / sparse[-1]).write_bytes(lower(_sparse(layer, case, x), (x,)).buffer)
            names.append(sparse[-1])
        with transport.temp_dir() as remote:
            transport.run(["mkdir", "-p", f"{remote}/lib"], "preparing the temp dir", 60)
            files = [(bundle[0], "edgesparse_kernel_bench"), *((lib, f"lib/{lib.name}") for lib in bundle[1:])]
            for local, name in [*files, *((Path(tmp) / n, n) for n in names)]:
                transport.push(local, f"{remote}/{name}")
            transport.run(["chmod", "+x", f"{remote}/edgesparse_kernel_bench"], "preparing the kernel bench", 60)
            proc = transport.run(["env", f"LD_LIBRARY_PATH={remote}/lib", *transport.runner_prefix(),
                                  f"{remote}/edgesparse_kernel_bench", "--rounds", str(rounds), "--runs", str(runs),
                                  *(f"{remote}/{n}" for n in names)], "running the kernel bench", 3600, check=False)
    result = _bench_output(proc, device)
    median = {n: statistics.median(m) for n, m in zip(names, result["medians_ms"])}
    rows = []
    for case, name in zip(all_cases, sparse):
        ours, base = median[name], median[dense[(case.op, case.inp, case.out, case.rows)]]
        rows.append({"op": case.op, "pattern": case.pattern, "dtype": "float32", "sparsity": case.sparsity, "shape": case.shape,
                     "in": case.inp, "out": case.out, "rows": case.rows * case.rows if case.op == "conv1x1" else case.rows,
                     "ours_ms": ours, "baseline": "xnnpack-fp32", "baseline_ms": base, "speedup": base / ours})
    emulated = transport.emulated or looks_emulated(state)
    table = {"device": device, "machine": machine, "cpu": state.get("cpu", ""), "cores": state.get("cores"),
             "threads": result["threads"], "runtime": "executorch-cpp (edgesparse_kernel_bench)", "emulated": emulated,
             "quick": quick, "rounds": rounds, "runs": runs, "rows": rows, "table": crossover(rows)}
    if emulated:
        table["timing_note"] = "emulated, not a speed: this table shows the flow and the file, not this CPU's crossovers"
    return table


def _bench_output(proc, device: str) -> dict:
    """edgesparse_kernel_bench's JSON line, or a one-line error saying why there is none."""
    import json

    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    try:
        result = json.loads(lines[-1]) if lines else {}
    except ValueError:
        result = {}
    if "error" in result:
        raise EdgesparseError(f"the kernel bench on {device} failed: {result['error']}")
    if proc.returncode or "medians_ms" not in result:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no output"
        raise EdgesparseError(f"the kernel bench on {device} failed (exit code {proc.returncode}): {last}")
    return result


def measure(device: str, quick: bool, threads: int) -> dict:
    """The crossover table of `device`: here in this process, elsewhere through its transport."""
    from edgesparse.devices import parse_device

    transport = parse_device(device)
    return measure_remote(transport, device, quick) if transport.remote else measure_local(device, quick, threads)


def measure_local(device: str, quick: bool, threads: int) -> dict:
    """The kernel sweep on this machine (bench_kernels: ours and dense XNNPACK in this process)
    as a crossover table recording the machine, CPU and thread count."""
    import platform

    from edgesparse.bench import bench_kernels, crossover
    from edgesparse.devices import parse_device

    transport = parse_device(device)
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
        table = load_table(path)  # one-line error for a missing or malformed file
        return path, path.name + (" (emulated timings, not a speed)" if table.get("emulated") else "")
    from edgesparse.devices import parse_device

    transport = parse_device(target)
    path = table_path(target)
    if not path.is_file():
        raise EdgesparseError(f"no crossover table measured on {target} ({path})",
                              hint=f"edgesparse bench kernels --device {target} --quick")
    machine = transport.info().get("machine", "")
    table = load_table(path)
    check_architecture(table, path.name, machine)
    return path, path.name + (" (emulated timings, not a speed)" if table.get("emulated") else "")
