"""The `edgesparse` command: a thin skin over the Python API (each command calls one function).

User errors print one line on stderr and exit with code 2; bugs keep their traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgesparse.errors import EdgesparseError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Prune, quantize and export PyTorch models that run faster on edge devices.")
out = Console()
out_err = Console(stderr=True)
_debug = False


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="on an error, print the full traceback too")):
    global _debug
    _debug = debug


@app.command()
def export(
    model: str = typer.Argument(..., help="demo:digits-cnn, demo:mobilenetv2, path/to/file.py:factory or model.pt2"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="recipe file (.toml, .yaml or .json); flags override it"),
    prune: Optional[float] = typer.Option(None, "--prune", help="target sparsity in [0, 1), e.g. 0.9"),
    pattern: Optional[str] = typer.Option(None, "--pattern", help="unstructured | block:RxC | nm:N:M | channel"),
    quant: Optional[str] = typer.Option(None, "--quant", help="none | int8 | int8-dynamic | int4w"),
    quant_method: Optional[str] = typer.Option(None, "--quant-method", help="int4w rounding: gptq | rtn (default: gptq when the model has calibration data)"),
    prune_method: Optional[str] = typer.Option(None, "--prune-method", help="magnitude | wanda | sparsegpt (calibrated one-shot; default: magnitude with a fine-tune, wanda for an all-linear model with calibration data and no fine-tune)"),
    fmt: str = typer.Option("pte", "--format", help="comma-separated formats: pte, onnx, tflite (tflite needs the [tflite] extra)"),
    onnx_sparse_storage: bool = typer.Option(False, "--onnx-sparse-storage", help="store mostly-zero ONNX initializers as sparse tensors (smaller file; ONNX Runtime densifies them at load)"),
    tflite_ops: str = typer.Option("builtin", "--tflite-ops", help="builtin (sparse weights + DENSIFY, any LiteRT) | edgesparse (swapped layers as our custom ops; needs our op library)"),
    finetune_steps: Optional[int] = typer.Option(None, "--finetune-steps", help="gradual pruning over N fine-tune steps (built-in demos; 0 = one-shot)"),
    act_sparsity: Optional[float] = typer.Option(None, "--act-sparsity", help="activation sparsity target in [0, 1), e.g. 0.5 (LMs with gated MLPs)"),
    act_method: Optional[str] = typer.Option(None, "--act-method", help="cats (default) | chess | teal"),
    act_finetune_steps: Optional[int] = typer.Option(None, "--act-finetune-steps", help="recovery fine-tune steps with the thresholds in place (0 = none)"),
    moe_offload: bool = typer.Option(False, "--moe-offload", help="MoE models: export the backbone plus one memory-mappable blob per expert, for the on-demand expert runtime"),
    expert_budget: float = typer.Option(0.25, "--expert-budget", help="with --moe-offload: the runtime's default fraction of expert bytes kept resident"),
    target: Optional[str] = typer.Option(None, "--target", help="decide sparse or dense per layer with a crossover table: "
                                         "TABLE.json, or a device spec whose table `bench kernels --device` measured"),
    output: Path = typer.Option(Path("out"), "-o", "--output", help="output folder"),
):
    """Compress MODEL and write verified artifacts plus manifest.json to the output folder."""
    from edgesparse.pipeline import export_model, parse_formats, recipe_from_options
    from edgesparse.recipe import Recipe

    if moe_offload:
        if recipe or prune is not None or pattern or act_sparsity is not None or fmt != "pte" or onnx_sparse_storage:
            raise EdgesparseError("--moe-offload takes only --expert-budget and --quant none|int8 (the experts' dtype)")
        export_moe(model, expert_budget, quant or "none", output)
        return
    formats = parse_formats(fmt)  # fail on a bad format before loading anything
    if tflite_ops not in ("builtin", "edgesparse"):
        raise EdgesparseError(f"unknown --tflite-ops {tflite_ops!r} (available: builtin, edgesparse)")
    base = Recipe.load(recipe) if recipe else None
    if base is None and finetune_steps is None and model.startswith("demo:"):
        # gradual magnitude pruning needs the fine-tune; wanda / sparsegpt are one-shot unless asked
        pruning = (prune or 0) > 0 or (pattern or "").startswith("nm")
        finetune_steps = 300 if pruning and prune_method in (None, "auto", "magnitude") else 0
    resolved = recipe_from_options(base, prune, pattern, quant, finetune_steps, act_sparsity, act_method, act_finetune_steps,
                                   prune_method=prune_method, quant_method=quant_method)
    import contextlib

    decide = contextlib.nullcontext()
    if target is not None:
        from edgesparse.runtime_kernels.crossover import use_table
        from edgesparse.targets import resolve

        decide = use_table(*resolve(target))
    with decide:
        record = export_model(model, resolved, output, formats, onnx_sparse_storage=onnx_sparse_storage, tflite_ops=tflite_ops)
    print_export_summary(record, output)
    if not all(a["verified"] for a in record["artifacts"]):
        raise EdgesparseError("an artifact failed verification against torch (see manifest.json)")


def export_moe(model: str, budget: float, quant: str, output: Path) -> None:
    from edgesparse.converters.moe_offload import export_moe_offload
    from edgesparse.models import load_model

    dtypes = {"none": "fp32", "int8": "int8"}
    if quant not in dtypes:
        raise EdgesparseError(f"--moe-offload stores experts as fp32 (--quant none) or int8, not {quant!r}")
    manifest = export_moe_offload(load_model(model), output, expert_budget=budget, dtype=dtypes[quant])
    total = manifest["expert_bytes_total"]
    experts = sum(len(row) for row in manifest["experts"])
    out.print(f"{output}: backbone {manifest['backbone_bytes'] / 2**20:.2f} MiB + {experts} expert blobs "
              f"({total / 2**20:.2f} MiB, {manifest['dtype']}); default budget {manifest['budget']:.0%} "
              f"({manifest['budget_bytes'] / 2**20:.2f} MiB resident); verified against torch in the numpy runtime")
    out.print(f"manifest: {output / 'moe.json'}; run it with `edgesparse profile {output}`")


def print_export_summary(record: dict, output: Path) -> None:
    table = Table(title=f"{record['model']}: sparsity {record['sparsity_overall']:.1%}, quant {record['quantization']['mode']}")
    for col in ("layer", "shape", "pattern", "sparsity", "dtype"):
        table.add_column(col, no_wrap=True, min_width=len(col))
    table.add_column("runs on / why dense", overflow="fold", ratio=1)
    layers = record["layers"]
    if len(layers) > 40:  # a large model: list the pruned layers only
        layers = [layer for layer in layers if layer["pattern"]]
        table.caption = f"{len(layers)} pruned of {len(record['layers'])} layers (all in manifest.json)"
    for layer in layers:
        shape = "x".join(map(str, layer.get("shape_after") or layer["shape"]))
        if layer.get("shape_after") and layer["shape_after"] != layer["shape"]:
            shape += f" (was {layer['shape'][0]})"
        note = layer["reason"] if not layer["pattern"] or layer["pattern"] == "channel" else layer["kernel"]
        table.add_row(layer["name"], shape, layer["pattern"] or "dense", f"{layer['sparsity']:.1%}", layer["dtype"], note)
    out.print(table)
    metrics = record["metrics"]
    if "accuracy_dense" in metrics:
        out.print(f"accuracy: dense {metrics['accuracy_dense']:.2%} -> compressed {metrics['accuracy_compressed']:.2%}")
    if "perplexity_dense" in metrics:
        out.print(f"perplexity: dense {metrics['perplexity_dense']:.2f} -> compressed {metrics['perplexity_compressed']:.2f}")
    if act := record.get("act_sparsity"):
        out.print(f"activation sparsity: {act['method']} target {act['target']:.0%}, measured {act['measured_sparsity']['mean']:.1%} "
                  f"on the calibration text, {act['kernel_layers']} layers on edgesparse kernels")
    for a in record["artifacts"]:
        err = f"cosine {a['cosine']:.6f}" if "min_cosine" in a.get("tolerance", {}) else f"max abs err {a['max_abs_error']:.2e}"
        acc = f", accuracy {a['accuracy']:.2%}" if "accuracy" in a else ""
        status = "[green]verified[/]" if a["verified"] else "[red]NOT verified[/]"
        size = f" ({a['size_vs_dense']:.0%} of its dense export)" if "size_vs_dense" in a else ""
        out.print(f"{output / a['path']}: {a['bytes'] / 1024:.1f} KiB{size}, {err}{acc}, {status}")
    out.print(f"manifest: {output / 'manifest.json'}")
    for warning in record.get("warnings", []):
        out_err.print(f"[bold yellow]warning:[/] {escape(warning)}", soft_wrap=True)


@app.command()
def inspect(
    artifact: Path = typer.Argument(..., help="a .pte, .onnx or .tflite file"),
    target: Optional[str] = typer.Option(None, "--target", help="arm64 or x86_64 (default: this machine)"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of the table"),
):
    """Per layer: shape, dtype, stored bytes, sparsity, pattern, and whether it runs sparse on the
    target runtime (and why not); then a one-line verdict and the fix."""
    import json

    from edgesparse.converters.inspect import inspect_artifact

    report = inspect_artifact(artifact, target)
    if json_out:
        print(json.dumps(report, indent=2))
        return
    table = Table(title=f"{artifact.name} ({report['runtime']}, target {report['target']})")
    for col in ("layer", "op", "shape", "dtype", "KiB", "sparsity", "pattern", "sparse"):
        table.add_column(col, overflow="fold", justify="right" if col in ("KiB", "sparsity") else "left")
    table.add_column("runs on / why dense", overflow="fold", min_width=24, ratio=1)
    for layer in report["layers"]:
        table.add_row(layer["name"], layer["op"], "x".join(map(str, layer["shape"])), layer["dtype"],
                      f"{layer['stored_bytes'] / 1024:.1f}", f"{layer['sparsity']:.1%}", layer["pattern"] or "-",
                      "[green]yes[/]" if layer["sparse"] else "no", layer["why"])
    out.print(table)
    color = "green" if report["verdict"].startswith("yes") else "yellow"
    out.print(f"[bold {color}]verdict:[/] {report['verdict']}")
    if report["fix"]:
        out.print(f"[bold]fix:[/] {report['fix']}")


@app.command()
def profile(
    artifact: Path = typer.Argument(..., help="a .pte or .onnx file"),
    device: str = typer.Option("local", "--device", help="where to run: local or ssh://user@host[:port][?identity=KEY&known_hosts=FILE]"),
    runs: int = typer.Option(100, "--runs", help="timed runs (at least)"),
    warmup: int = typer.Option(10, "--warmup", help="untimed runs first"),
    threads: int = typer.Option(1, "--threads", help="runtime threads (1 = comparable, noise-free default)"),
    runtime: Optional[str] = typer.Option(None, "--runtime", help="python (ExecuTorch's Python runtime; local default) or cpp (the torch-free C++ runner; the only one on remote devices)"),
    mode: str = typer.Option("quick", "--mode", help="quick (>= 50 runs and >= 1 s), report (>= 1024 runs and >= 60 s) or runs (exactly --runs)"),
    cpus: Optional[str] = typer.Option(None, "--cpus", help="pin the runner to these CPUs, e.g. 4,5,6,7 (big cores)"),
    per_op: bool = typer.Option(False, "--per-op", help="then per-operator times (ETDump for .pte, ORT profiling for .onnx; local)"),
    policy: str = typer.Option("predictive", "--policy", help="MoE exports: expert cache policy lru | lfu | predictive"),
    expert_budget: Optional[float] = typer.Option(None, "--expert-budget", help="MoE exports: resident fraction of expert bytes (default: the export's)"),
    tokens: int = typer.Option(256, "--tokens", help="MoE exports: tokens to decode (times are per token)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the full result as JSON here"),
):
    """Time ARTIFACT on a device: load, first run, steady-state percentiles, peak memory.
    A MoE offload export (its folder or moe.json) decodes --tokens tokens in the expert runtime."""
    from edgesparse._io import write_json_atomic
    from edgesparse.devices import profile as run_profile
    from edgesparse.devices.sweep import parse_grid

    if artifact.name == "moe.json" or (artifact / "moe.json").is_file():
        if device != "local":
            raise EdgesparseError("MoE exports profile here only; on a board copy devices/moe_runtime.py and the export, "
                                  "then run `python3 moe_runtime.py EXPORT --json`")
        from edgesparse.devices.moe_bench import profile_moe

        result = profile_moe(artifact, policy=policy, budget=expert_budget, tokens=tokens)
        artifact = Path(result["artifact"])
        device = f"local, {policy} cache at {result['budget']:.0%} of expert bytes"

    else:
        options = {"runtime": runtime} if runtime else {}
        if cpus:
            options["cpus"] = parse_grid(cpus, int)
        if per_op:
            options["per_op"] = True
        result = run_profile(artifact, device, mode=None if mode == "runs" else mode, runs=runs, warmup=warmup,
                             threads=threads, **options)
    table = Table(title=f"{artifact.name} on {device}, {result['runtime']} ({result['threads']} thread(s), {result['count']} runs)")
    for col in ("load ms", "first ms", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "mean ms", "std ms", "peak RSS MB"):
        table.add_column(col, justify="right")
    table.add_row(*(f"{result[k]:.3f}" for k in ("load_ms", "first_run_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms", "std_ms")),
                  f"{result['peak_rss_mb']:.1f}")
    out.print(table)
    if "hit_rate" in result:  # a MoE export
        out.print(f"{result['tokens_per_s']:.0f} tokens/s; expert cache hit rate {result['hit_rate']:.1%}, peak cache "
                  f"{result['cache_peak_bytes'] / 2**20:.2f} of {result['budget_bytes'] / 2**20:.2f} MiB budget")
    if result.get("timing_note"):
        out.print(f"[bold yellow]{result['timing_note']}[/]: {result['device']} runs under qemu; use it to check that the model runs")
    if result.get("per_op"):
        ops = Table(title="per operator (median per call, slowest first; the full list is in the JSON)")
        for col, justify in (("operator", "left"), ("kind", "left"), ("calls", "right"), ("median us", "right")):
            ops.add_column(col, justify=justify)
        for row in sorted(result["per_op"], key=lambda r: -r["median_ms"])[:15]:
            ops.add_row(row["name"], row.get("op", ""), str(row["calls"]), f"{1e3 * row['median_ms']:.1f}")
        out.print(ops)
        if result.get("per_op_summary"):
            summary = result["per_op_summary"]
            out.print(f"per inference: {summary['delegate_calls']} XNNPACK delegate calls (partitions), "
                      f"{summary['transposes']} transposes, {summary['operator_calls']} ops outside XNNPACK")
    if json_out:
        write_json_atomic(json_out, result)
        out.print(f"wrote {json_out}")


@app.command()
def sweep(
    model: str = typer.Argument(..., help="demo:NAME, a .pt2 file or module:factory"),
    prune: str = typer.Option("0,0.5,0.8,0.9", "--prune", help="sparsities, comma-separated"),
    quant: str = typer.Option("none,int8", "--quant", help="quantization modes, comma-separated"),
    fmt: str = typer.Option("pte,onnx", "--format", help="formats, comma-separated"),
    pattern: str = typer.Option("block:4x1", "--pattern", help="pruning pattern for sparsities > 0"),
    device: str = typer.Option("local", "--device", help="where to profile (see `edgesparse devices`)"),
    runs: int = typer.Option(100, "--runs"),
    finetune_steps: int = typer.Option(300, "--finetune-steps", help="gradual pruning steps per pruned cell (built-in demos)"),
    output: Path = typer.Option(Path("sweep"), "-o", "--output", help="folder: results.jsonl (resumable), pareto.png, cells"),
    devices: Optional[str] = typer.Option(None, "--devices", help="a fleet: device specs, comma-separated; each "
                                          "(variant, device) cell is a Ray task, one profile per device at a time"),
    ray_address: Optional[str] = typer.Option(None, "--ray", help="`local` (a private Ray on 127.0.0.1, the default "
                                              "with --devices) or HOST:PORT of a running Ray head"),
):
    """Export + profile every (prune, quant, format) cell; a rerun skips finished cells."""
    from edgesparse.devices.sweep import parse_grid, sweep as run_sweep

    grid = parse_grid(prune, float), parse_grid(quant, str), parse_grid(fmt, str)
    if devices is not None or ray_address is not None:
        from edgesparse.fleet import fleet_sweep

        fleet = parse_grid(devices, str) if devices is not None else [device]
        rows = fleet_sweep(model, *grid, fleet, output, address=ray_address or "local", pattern=pattern, runs=runs,
                           finetune_steps=finetune_steps, log=lambda line: out_err.print(line, markup=False, highlight=False))
        where, plots = ", ".join(fleet), "pareto-*.png"
    else:
        rows = run_sweep(model, *grid, device, output, pattern=pattern, runs=runs, finetune_steps=finetune_steps)
        where, plots = device, "pareto.png"
    table = Table(title=f"{model} sweep on {where} ({output / 'results.jsonl'})")
    fleet_columns = devices is not None or ray_address is not None
    for col in ("prune", "quant", "format", *(("device",) if fleet_columns else ()), "accuracy", "p50 us", "p90 us",
                "size KiB", "peak RSS MB", "sparse layers"):
        table.add_column(col, justify="right")
    notes = []
    for r in rows:
        head = [f"{r['prune']:g}", r["quant"], r["format"], *((r["device"],) if fleet_columns else ())]
        if "skipped" in r or "failed" in r:
            what = "skipped" if "skipped" in r else "failed"
            table.add_row(*head, f"[dim]{what}", "", "", "", "", "")
            notes.append(f"{what} {' / '.join(head)}: {r[what]}")
            continue
        accuracy = f"{100 * r['accuracy']:.2f}%" if r.get("accuracy") is not None else "-"
        emulated = " (emulated)" if r.get("timing_note") else ""
        table.add_row(*head, accuracy, f"{1e3 * r['p50_ms']:.1f}{emulated}", f"{1e3 * r['p90_ms']:.1f}",
                      f"{r['bytes'] / 1024:.1f}", f"{r['peak_rss_mb']:.1f}", str(r["sparse_layers"]))
    out.print(table)
    for note in notes:
        out.print(note, style="dim", markup=False, highlight=False)
    out.print(f"wrote {output / plots}")


@app.command()
def compare(
    a: Path = typer.Argument(..., help="profile JSON (the baseline)"),
    b: Path = typer.Argument(..., help="profile JSON (the candidate)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the comparison as JSON here"),
):
    """What changed from profile A to profile B, with the noise band of the median."""
    from edgesparse._io import write_json_atomic
    from edgesparse.devices.compare import compare as run_compare, load_profile

    result = run_compare(load_profile(a), load_profile(b))
    table = Table(title=f"{a.name} -> {b.name}: {result['verdict']} (p50 noise band +-{result['p50_noise_ms']:.4f} ms)")
    for col in ("metric", "A", "B", "delta", "delta %"):
        table.add_column(col, justify="right")
    for row in result["rows"]:
        table.add_row(row["metric"], f"{row['a']:.4f}", f"{row['b']:.4f}", f"{row['delta']:+.4f}", f"{row['delta_pct']:+.1f}%")
    out.print(table)
    if json_out:
        write_json_atomic(json_out, result)
        out.print(f"wrote {json_out}")


@app.command()
def report(
    dirs: list[Path] = typer.Argument(..., help="sweep output or export folders (sweep JSONL, manifest.json, profile JSON)"),
    output: Path = typer.Option(Path("report.html"), "-o", "--output", help="the page (self-contained HTML)"),
):
    """One static page: per-device Pareto plots, the sweep table, compare deltas, per-operator tops, per-layer decisions."""
    from edgesparse.report import build_report

    found = build_report(dirs, output)
    for note in found["notes"]:
        out.print(f"[dim]not used: {note}")
    out.print(f"wrote {output}: {found['rows']} sweep row(s) from {found['sweeps']} file(s), {found['manifests']} manifest(s), "
              f"{found['profiles']} profile(s), {found['bytes'] / 1024:.0f} KiB")


@app.command()
def devices():
    """List the devices edgesparse can reach: this machine and the configured ssh hosts."""
    from edgesparse.devices.transports import list_devices

    table = Table(title="devices (use the spec with --device)")
    for col in ("spec", "kind", "note"):
        table.add_column(col)
    for row in list_devices():
        table.add_row(row["spec"], row["kind"], row["note"])
    out.print(table)


bench_app = typer.Typer(help="Benchmarks: ours vs baselines from the same run (interleaved, medians).")
app.add_typer(bench_app, name="bench")


@bench_app.command("kernels")
def bench_kernels_cmd(
    quick: bool = typer.Option(False, "--quick", help="fewer shapes and sparsities (a few minutes)"),
    threads: int = typer.Option(1, "--threads"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the rows as JSON here"),
    crossover_out: Optional[Path] = typer.Option(None, "--crossover", help="write the sparse/dense crossover table here (export reads runtime_kernels/crossover.json)"),
    markdown_out: Optional[Path] = typer.Option(None, "--markdown", help="write the results as markdown tables here"),
    device: Optional[str] = typer.Option(None, "--device", help="measure the crossovers for this device and write its "
                                         "table (named after it; `export --target DEVICE` reads it)"),
):
    """Sparse kernels vs dense XNNPACK (fp32, int8) and ONNX Runtime, one layer at a time."""
    from edgesparse import runtime_kernels
    from edgesparse._io import write_json_atomic
    from edgesparse.bench import bench_kernels

    if not runtime_kernels.available():
        raise EdgesparseError("the sparse kernels are not built", hint="run `make kernels`")
    if device is not None:
        from edgesparse.targets import measure, table_path

        table = measure(device, quick, threads)
        path = crossover_out or table_path(device)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, table)
        decided = sum(e["min_sparsity"] is not None for e in table["table"])
        out.print(f"{device}: {table['machine']}, {table['cpu']}, {table['threads']} thread(s) (as the runtime used): "
                  f"{len(table['table'])} shapes ({decided} where our kernel wins from some sparsity); wrote {path}")
        if table.get("timing_note"):
            out.print(f"note: {table['timing_note']}")
        return
    rows = bench_kernels(quick=quick, threads=threads)
    if not rows:
        raise EdgesparseError("no benchmark cases ran")
    table = Table(title=f"sparse kernels vs dense baselines: speedup = baseline / ours "
                        f"({threads} thread{'s' if threads > 1 else ''}, ISA {rows[0]['isa']}, medians)")
    columns = {("float32", "xnnpack-fp32"): "vs XNNPACK fp32", ("float32", "xnnpack-int8"): "vs XNNPACK int8",
               ("float32", "onnxruntime-fp32"): "vs ORT fp32", ("int8", "xnnpack-int8"): "ours int8 vs XNNPACK int8"}
    for col in ("op", "shape", "pattern", "sparsity", "ours ms", *columns.values()):
        table.add_column(col, justify="right", no_wrap=True)
    cases: dict[tuple, dict] = {}  # one line per case: its fp32 row against each baseline, and its int8 row
    for row in rows:
        cases.setdefault((row["op"], row["shape"], row["pattern"], row["sparsity"]), {})[(row["dtype"], row["baseline"])] = row
    for (op, shape, pattern, sparsity), by in cases.items():
        ours = by[("float32", "xnnpack-fp32")]["ours_ms"]
        table.add_row(op, shape, pattern.replace("unstructured", "unstr."), f"{sparsity:.0%}", f"{ours:.3f}",
                      *(f"{by[key]['speedup']:.2f}x" if key in by else "" for key in columns))
    out.print(table)
    if json_out:
        write_json_atomic(json_out, rows)
        out.print(f"wrote {json_out}")
    if crossover_out:
        from edgesparse.bench import crossover

        write_json_atomic(crossover_out, {"isa": rows[0]["isa"], "threads": threads, "table": crossover(rows)})
        out.print(f"wrote {crossover_out}")
    if markdown_out:
        from edgesparse._io import write_bytes_atomic
        from edgesparse.bench import to_markdown

        write_bytes_atomic(markdown_out, to_markdown(rows).encode())
        out.print(f"wrote {markdown_out}")


@bench_app.command("fleet")
def bench_fleet_cmd(
    model: str = typer.Argument("demo:digits-cnn"),
    devices: str = typer.Option(..., "--devices", help="device specs, comma-separated"),
    prune: str = typer.Option("0,0.5,0.8,0.9", "--prune"),
    quant: str = typer.Option("none,int8", "--quant"),
    fmt: str = typer.Option("pte", "--format"),
    runs: int = typer.Option(100, "--runs"),
    finetune_steps: int = typer.Option(0, "--finetune-steps"),
    ray_address: str = typer.Option("local", "--ray"),
    output: Path = typer.Option(Path("bench-fleet"), "-o", "--output"),
    json_out: Optional[Path] = typer.Option(None, "--json"),
):
    """Wall time: today's sequential sweep (once per device) vs the fleet sweep over the same cells."""
    from edgesparse._io import write_json_atomic
    from edgesparse.devices.sweep import parse_grid
    from edgesparse.fleet import bench_fleet

    result = bench_fleet(model, parse_grid(prune, float), parse_grid(quant, str), parse_grid(fmt, str),
                         parse_grid(devices, str), output, address=ray_address, runs=runs, finetune_steps=finetune_steps,
                         log=lambda line: out_err.print(line, markup=False, highlight=False))
    out.print(f"{result['cells']} cells on {len(result['devices'])} devices ({result['failed']} failed): sequential "
              f"{result['sequential_s']:.1f} s, fleet {result['fleet_s']:.1f} s, ratio {result['ratio']:.2f} "
              f"({result['cpus']} CPUs)")
    if json_out:
        write_json_atomic(json_out, result)
        out.print(f"wrote {json_out}")


@bench_app.command("actsparse")
def bench_actsparse_cmd(
    methods: str = typer.Option("cats,chess,teal", "--methods", help="comma-separated: cats, chess, teal"),
    targets: str = typer.Option("0.3,0.5,0.7", "--targets", help="activation-sparsity targets"),
    finetune_steps: int = typer.Option(0, "--finetune-steps", help="also measure each cell after a recovery fine-tune of N steps"),
    latency_targets: str = typer.Option("0.5", "--latency-targets", help="targets whose decode latency is measured (each exports two .pte files; empty: none)"),
    rounds: int = typer.Option(5, "--rounds", help="interleaved timing rounds"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the rows as JSON here"),
    markdown_out: Optional[Path] = typer.Option(None, "--markdown", help="write the table as markdown here"),
):
    """CATS / CHESS / TEAL on SmolLM2-135M: held-out perplexity vs dense, and decode ms/token on our kernels vs dense."""
    from edgesparse import runtime_kernels
    from edgesparse._io import write_bytes_atomic, write_json_atomic
    from edgesparse.bench_actsparse import bench_actsparse, to_markdown
    from edgesparse.devices.sweep import parse_grid
    from edgesparse.recipe import ActSparsityConfig

    method_list = parse_grid(methods, str)
    for method in method_list:
        ActSparsityConfig(method=method)  # one-line error for an unknown method
    lat = parse_grid(latency_targets, float) if latency_targets.strip() else []
    if lat and not runtime_kernels.available():
        raise EdgesparseError("the sparse kernels are not built", hint="run `make kernels`")
    rows = bench_actsparse(method_list, parse_grid(targets, float), finetune_steps, lat, rounds=rounds)
    out.print(to_markdown(rows))
    if json_out:
        write_json_atomic(json_out, rows)
        out.print(f"wrote {json_out}")
    if markdown_out:
        write_bytes_atomic(markdown_out, (to_markdown(rows) + "\n").encode())
        out.print(f"wrote {markdown_out}")


@bench_app.command("models")
def bench_models_cmd(
    quick: bool = typer.Option(False, "--quick", help="one-shot pruning, dense + int8 + one pruned variant per model, .pte/.onnx (< 10 min)"),
    models: Optional[str] = typer.Option(None, "--models", help="comma-separated subset, e.g. demo:digits-cnn,demo:minilm-l6"),
    json_out: Path = typer.Option(..., "--json", help="write the rows as JSON here"),
    markdown_out: Optional[Path] = typer.Option(None, "--markdown", help="write the table as markdown here"),
):
    """The model zoo, whole-model: dense / int8 / pruned exports of MiniLM-L6, MobileNetV2, SmolLM2's
    decode step and the digits CNN, verified, timed vs their own dense export at 1 thread and all
    cores. Without --quick: the full grid with fine-tuning and .tflite (hours on 2 cores; estimated ~2 h idle, not yet measured)."""
    from edgesparse._io import write_bytes_atomic, write_json_atomic
    from edgesparse.bench_models import bench_models, to_markdown
    from edgesparse.devices.sweep import parse_grid

    def write(result: dict) -> None:  # after each model too: a long run keeps what it measured
        write_json_atomic(json_out, result)
        if markdown_out:
            write_bytes_atomic(markdown_out, to_markdown(result).encode())

    result = bench_models(quick=quick, models=parse_grid(models, str) if models else None, on_model=write)
    write(result)
    out.print(to_markdown(result), markup=False, highlight=False)
    out.print(f"wrote {json_out}" + (f" and {markdown_out}" if markdown_out else ""))


@bench_app.command("moe")
def bench_moe_cmd(
    source: str = typer.Argument("demo:tiny-moe", help="a MoE export folder, or a model spec to export first"),
    budgets: str = typer.Option("1,0.5,0.25,0.125", "--budgets", help="resident fractions of expert bytes (1 = all resident)"),
    policies: str = typer.Option("lru,lfu,predictive", "--policies"),
    tokens: int = typer.Option(256, "--tokens", help="tokens decoded per cell"),
    repeats: int = typer.Option(1, "--repeats", help="runs per cell, cells interleaved; rows keep the median tokens/s"),
    dtype: str = typer.Option("fp32", "--dtype", help="expert dtype when SOURCE is exported first: fp32 | int8"),
    io: str = typer.Option("read", "--io", help="how experts are loaded: read (pread into an arena) | mmap"),
    drop_evicted: bool = typer.Option(False, "--drop-evicted", help="drop evicted experts from the page cache too (misses read from disk)"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="prompt text (default: the export's sample prompt)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the rows as JSON here"),
):
    """Expert offloading: peak RSS, tokens/s, hit rate, prefetch precision/recall per (policy, budget),
    each in a fresh process with the page cache dropped where the OS allows."""
    from edgesparse._io import write_json_atomic
    from edgesparse.devices.moe_bench import bench_moe, format_table, goals
    from edgesparse.devices.sweep import parse_grid

    rows = bench_moe(source, parse_grid(budgets, float), parse_grid(policies, str), tokens, prompt=prompt, dtype=dtype,
                     io=io, drop_evicted=drop_evicted, repeats=repeats)
    out.print(format_table(rows))
    verdict = goals(rows)
    out.print(" ".join(f"{k}: {v}" for k, v in verdict.items()))
    if json_out:
        write_json_atomic(json_out, rows)
        out.print(f"wrote {json_out}")


@bench_app.command("runner")
def bench_runner_cmd(
    artifact: Path = typer.Argument(..., help="a .pte file"),
    rounds: int = typer.Option(5, "--rounds"),
    runs: int = typer.Option(500, "--runs"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the result as JSON here"),
):
    """The profiler's overhead: `profile` p50 vs a bare execute() loop, same run, interleaved."""
    from edgesparse._io import write_json_atomic
    from edgesparse.bench import bench_runner

    if not artifact.is_file():
        raise EdgesparseError(f"artifact not found: {artifact}")
    result = bench_runner(artifact, rounds=rounds, runs=runs)
    table = Table(title=f"profiler overhead on {artifact.name} ({rounds} rounds x {runs} runs, medians)")
    for col in ("profile p50 ms", "bare loop p50 ms", "overhead"):
        table.add_column(col, justify="right")
    table.add_row(f"{result['profile_p50_ms']:.4f}", f"{result['bare_loop_p50_ms']:.4f}", f"{result['overhead_pct']:+.2f}%")
    out.print(table)
    if json_out:
        write_json_atomic(json_out, result)
        out.print(f"wrote {json_out}")


@app.command()
def demo(
    model: str = typer.Option("demo:digits-cnn", "--model", help="built-in demo model"),
    output: Path = typer.Option(Path("out/demo"), "-o", "--output"),
    prune: float = typer.Option(0.9, "--prune"),
    pattern: str = typer.Option("block:4x1", "--pattern"),
    quant: str = typer.Option("int8", "--quant"),
    finetune_steps: int = typer.Option(300, "--finetune-steps"),
    rounds: int = typer.Option(3, "--rounds", help="interleaved profiling rounds (dense, compressed, dense, ...)"),
):
    """Export MODEL dense and compressed, profile both interleaved, and print a before/after table."""
    from edgesparse.demo import run_demo

    run_demo(model, output, prune, pattern, quant, finetune_steps, rounds, out)


def _quiet_third_party() -> None:
    """Known import-time noise from dependencies (torchao's optional CUDA extensions failing to
    load on a CPU build, torch's pytree deprecation notes, exir's DeprecationWarnings)."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _quiet_third_party()
    try:
        app(standalone_mode=True)
    except EdgesparseError as exc:
        if _debug or os.environ.get("EDGESPARSE_DEBUG"):
            import traceback

            traceback.print_exception(exc.__cause__ or exc)
        print(f"edgesparse: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("edgesparse: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()

