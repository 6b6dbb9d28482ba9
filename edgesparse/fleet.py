"""`edgesparse sweep MODEL --devices A,B,C [--ray ADDRESS|local]`: one sweep grid on a fleet of
devices, scheduled by Ray.

Each variant (prune, quant, format) is exported and verified once, here, into OUT/prune{p}-{q}/{fmt}
(the shared folder; its bytes also go into Ray's object store for workers on other nodes). Each
(variant, device) cell is then one Ray task that profiles the artifact on its device. Every
device is a Ray custom resource of capacity 1 and each task asks for 1 of it, so two profiles never
share a device while different devices run in parallel, and the next variant exports while the
devices profile the previous ones.

Rows go to OUT/results.jsonl (the format of devices/sweep.py, key `prune{p}-{q}-{fmt}@{device}`,
a `device` field) from this process only, as each task finishes, so every cell is recorded once.
A task whose device cannot be reached, whose run fails or whose worker dies gives a row with
`failed` (one line) and the others carry on. A rerun skips finished and skipped cells and retries
the failed ones (their old rows are dropped first, so a key is never in the file twice).

Ray is optional (`pip install 'edgesparse[fleet]'`). `--ray local` starts a private Ray instance
on 127.0.0.1 for this run (no dashboard) and stops it at the end; `--ray HOST:PORT` joins a
running cluster whose nodes declare the device resources (`ray start --resources`; the error
says the exact line).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from pathlib import Path

from edgesparse.errors import EdgesparseError, first_line

RAY_HINT = "pip install 'edgesparse[fleet]'  (Ray, the fleet scheduler)"


def import_ray():
    try:
        import ray
    except ImportError:
        raise EdgesparseError("--ray needs Ray, which is not installed", hint=RAY_HINT) from None
    return ray


def device_resource(spec: str) -> str:
    """The Ray custom resource standing for one device (capacity 1): a stable name from its spec."""
    return "edgesparse_device_" + hashlib.sha1(spec.encode()).hexdigest()[:12]


def fleet_key(cell: str, device: str) -> str:
    return f"{cell}@{device}"


def check_address(address: str, timeout: float = 5.0) -> None:
    """Fail in one line, before Ray's own long retries, when nothing answers at HOST:PORT."""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise EdgesparseError(f"bad Ray address {address!r}", hint="HOST:PORT of a running Ray head, or `local`")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise EdgesparseError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}",
                              hint="start it with `ray start --head`, or use --ray local") from None


@contextlib.contextmanager
def loopback_only(ray):
    """Ray's single-machine mode while a local instance starts: its node address is 127.0.0.1
    and the GCS, raylet and worker gRPC servers listen there only. (`_node_ip_address="127.0.0.1"`
    is not enough: Ray swaps a loopback address for the machine's routable one, and its servers
    then listen on every interface.) The processes started inherit the variable."""
    from ray._private import ray_constants

    saved = os.environ.get(LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_ENV], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved[1]
        if saved[0] is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = saved[0]


# read by ray._private.ray_constants.ENABLE_RAY_CLUSTER: off = no cluster, everything on loopback
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def connect(ray, address: str, devices: list[str]) -> bool:
    """Start (`local`) or join a Ray cluster whose nodes hold one unit of each device's resource.
    Returns whether this process started the instance (and so must shut it down)."""
    resources = {device_resource(d): 1.0 for d in devices}
    quiet = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address == "local":
        with loopback_only(ray):
            # address="local" never joins an existing cluster (None would)
            ray.init(address="local", num_cpus=os.cpu_count() or 1, resources=resources, **quiet)
        return True
    check_address(address)
    try:
        ray.init(address=address, **quiet)
    except Exception as exc:  # ConnectionError, a version mismatch, ...
        raise EdgesparseError(f"cannot join the Ray cluster at {address}: {first_line(exc)}") from None
    have = ray.cluster_resources()
    missing = {name: 1 for name in resources if have.get(name, 0) < 1}
    if missing:
        ray.shutdown()
        names = ", ".join(d for d in devices if device_resource(d) in missing)
        raise EdgesparseError(f"the Ray cluster at {address} has no resource for {names}",
                              hint=f"ray start --address {address} --resources '{json.dumps(missing)}'")
    return False


def drop_failed(results: Path) -> None:
    """Remove failed rows (a rerun retries them) with one atomic rewrite; keep everything else."""
    from edgesparse.devices.sweep import read_rows

    rows = read_rows(results)
    kept = [r for r in rows if "failed" not in r]
    if len(kept) != len(rows):
        tmp = results.with_suffix(".jsonl.part")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, results)


def profile_cell(artifact: str, data: bytes, device: str, runs: int, warmup: int, row: dict) -> dict:
    """The body of one Ray task: profile `artifact` on `device` and return the finished row. Reads
    the shared folder's file, or (a worker on another node) writes the object store's copy first."""
    import tempfile

    from edgesparse.devices import profile

    started = time.perf_counter()
    row = dict(row)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(artifact)
            if not path.is_file() or path.stat().st_size != len(data):
                path = Path(tmp) / path.name
                path.write_bytes(data)
            result = profile(path, device, mode="quick", runs=runs, warmup=warmup)
        row.update(p50_ms=result["p50_ms"], p90_ms=result["p90_ms"], peak_rss_mb=result["peak_rss_mb"],
                   runtime=result["runtime"], threads=result.get("threads"))
        if note := result.get("timing_note"):
            row["timing_note"] = note
    except EdgesparseError as exc:
        row["failed"] = str(exc)
    row["wall_s"] = round(time.perf_counter() - started, 3)
    return row


def fleet_sweep(model: str, prunes: list[float], quants: list[str], formats: list[str], devices: list[str], out: Path,
                address: str = "local", pattern: str = "block:4x1", runs: int = 100, warmup: int = 10,
                finetune_steps: int = 300, log=print) -> list[dict]:
    """Export each variant once, profile it on every device as Ray tasks, record each cell once."""
    from edgesparse.devices import parse_device
    from edgesparse.devices.sweep import cell_key, plot_pareto, read_rows
    from edgesparse.pipeline import parse_formats

    ray = import_ray()
    formats = parse_formats(",".join(formats))
    devices = list(dict.fromkeys(d.strip() for d in devices if d.strip()))
    if not devices:
        raise EdgesparseError("no devices in --devices", hint="comma-separated device specs, e.g. local,qemu-aarch64")
    for device in devices:
        parse_device(device)  # a malformed spec is the user's mistake: one line, exit 2, nothing run
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    drop_failed(results)
    done = {row["key"] for row in read_rows(results)}
    variants = [(p, q, f) for p in prunes for q in quants for f in formats]
    keys = {fleet_key(cell_key(*v), d) for v in variants for d in devices}
    if keys - done:
        from edgesparse.models import load_model

        bundle = load_model(model)  # a bad model spec fails here, in one line, before Ray starts
        started_here = connect(ray, address, devices)
        try:
            _run(ray, bundle, variants, devices, done, out, results, pattern, runs, warmup, finetune_steps, log)
        finally:
            if started_here:
                ray.shutdown()
    rows = [r for r in read_rows(results) if r["key"] in keys]
    for device in devices:
        mine = [r for r in rows if r.get("device") == device]
        plot_pareto(mine, out / f"pareto-{device_resource(device)}.png", f"{model} on {device}")
    return rows


def _run(ray, bundle, variants, devices, done, out, results, pattern, runs, warmup, finetune_steps, log) -> None:
    from edgesparse.devices.sweep import append_row, cell_key
    from edgesparse.pipeline import export_model, recipe_from_options

    task = ray.remote(num_cpus=0, max_retries=0)(profile_cell)
    pending: dict = {}

    def record(ref, row: dict) -> None:
        try:
            row = ray.get(ref)
        except Exception as exc:  # the worker died, the task was cancelled, ...
            row = row | {"failed": f"the Ray task failed: {first_line(exc)}"}
        append_row(results, row)
        if "failed" in row:
            log(f"failed {row['key']}: {row['failed']}")

    def drain(block: bool) -> None:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=None if block else 0)
            if not ready:
                return
            record(ready[0], pending.pop(ready[0]))

    for prune, quant, fmt in variants:
        cell = cell_key(prune, quant, fmt)
        need = [d for d in devices if fleet_key(cell, d) not in done]
        if not need:
            continue
        base = {"prune": prune, "quant": quant, "format": fmt, "pattern": pattern, "cell": cell}
        folder = out / f"prune{prune:g}-{quant}" / fmt
        try:
            recipe = recipe_from_options(None, prune, pattern if prune > 0 else None, quant,
                                         finetune_steps if prune > 0 else 0)
            record_ = export_model(bundle, recipe, folder, formats=[fmt])
        except EdgesparseError as exc:  # e.g. a format that cannot hold this quantization: every device's row says so
            for device in need:
                append_row(results, base | {"key": fleet_key(cell, device), "device": device, "skipped": exc.message})
            continue
        artifact = record_["artifacts"][0]
        base |= {"bytes": artifact["bytes"],
                 "accuracy": artifact.get("accuracy", record_["metrics"].get("accuracy_compressed")),
                 "sparse_layers": sum(layer["kernel"] != "dense-xnnpack" for layer in record_["layers"])}
        path = folder / artifact["path"]
        data = ray.put(path.read_bytes())
        for device in need:
            row = base | {"key": fleet_key(cell, device), "device": device}
            ref = task.options(resources={device_resource(device): 1}).remote(str(path), data, device, runs, warmup, row)
            pending[ref] = row
        drain(block=False)
    drain(block=True)


def bench_fleet(model: str, prunes: list[float], quants: list[str], formats: list[str], devices: list[str], out: Path,
                address: str = "local", runs: int = 100, finetune_steps: int = 0, log=print) -> dict:
    """`edgesparse bench fleet`: wall time of today's sequential sweep (`sweep` once per device, one
    cell at a time) against the fleet sweep over the same cells, each into a fresh folder."""
    import shutil

    from edgesparse.devices.sweep import sweep

    out.mkdir(parents=True, exist_ok=True)
    for name in ("sequential", "fleet"):
        shutil.rmtree(out / name, ignore_errors=True)
    started = time.perf_counter()
    for index, device in enumerate(devices):
        log(f"sequential: {device}")
        sweep(model, prunes, quants, formats, device, out / "sequential" / str(index), runs=runs, finetune_steps=finetune_steps)
    sequential = time.perf_counter() - started
    log("fleet")
    started = time.perf_counter()
    rows = fleet_sweep(model, prunes, quants, formats, devices, out / "fleet", address=address, runs=runs,
                       finetune_steps=finetune_steps, log=log)
    fleet = time.perf_counter() - started
    return {"model": model, "devices": devices, "cells": len(rows), "failed": sum("failed" in r for r in rows),
            "sequential_s": round(sequential, 1), "fleet_s": round(fleet, 1), "ratio": round(fleet / sequential, 3),
            "cpus": os.cpu_count(), "note": "wall times on a shared machine; the fleet time includes starting Ray"}
