"""`edgesparse bench models`: the model zoo, whole-model, measured in one run.

For each real pretrained model (demo:digits-cnn, demo:mobilenetv2, demo:minilm-l6,
demo:smollm2-135m's decode step): dense fp32, int8 and pruned variants, each exported by
`pipeline.export_model` to .pte / .onnx (/ .tflite) and verified against torch, then timed with
`profile_local` against the dense export of the same format: at 1 thread pinned to CPU 0 and at
all cores, in interleaved rounds (dense, variant 1, variant 2, dense, ...), each row's p50 the
median of its per-round p50s and its speedup the ratio of the two medians from those same rounds.
A variant or format that cannot be exported, verified or profiled becomes a row with its
one-line reason, never a crash.

--quick: one-shot pruning (no fine-tuning; the digits CNN gets 100 steps), dense + one int8 + one pruned variant per model
(and pruned + int8 on our int8 kernels for MobileNetV2 and MiniLM, also timed against their int8 row),
.pte and .onnx, 3 rounds of short runs. The full grid fine-tunes the CNNs (gradual pruning) and
adds block 4x1/8x1 at 80/90%, 2:4 and .tflite.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgesparse import _progress
from edgesparse.errors import EdgesparseError, first_line


@dataclass(frozen=True)
class Variant:
    name: str
    pattern: str | None = None  # None: dense
    sparsity: float = 0.0
    quant: str = "none"

    @property
    def dense(self) -> bool:
        return self.pattern is None and self.quant == "none"


@dataclass
class ModelPlan:
    spec: str
    variants: list[Variant]
    formats: tuple[str, ...] = ("pte", "onnx")
    finetune_steps: int = 0  # gradual pruning steps for the pruned variants (built-in hooks)
    note: str = ""
    load_kwargs: dict = field(default_factory=dict)  # to the demo's bundle() (e.g. a smaller eval set)


DENSE = Variant("dense fp32")
# pruned layers on our int8 kernels, the rest in the runtime's int8 (timed against the int8 row too)
CNN_SPARSE_INT8 = Variant("block:8x1 80% + int8", "block:8x1", 0.8, "int8")
LM_SPARSE_INT8 = Variant("block:8x1 90% + int8-dynamic", "block:8x1", 0.9, "int8-dynamic")


def _pruned(patterns: tuple[str, ...], sparsities: tuple[float, ...], nm: bool = True) -> list[Variant]:
    out = [Variant(f"{p} {s:.0%}", p, s) for p in patterns for s in sparsities]
    return out + ([Variant("2:4", "nm:2:4", 0.0)] if nm else [])


def grid(quick: bool) -> list[ModelPlan]:
    """What the benchmark runs; --quick keeps one int8 and one pruned variant per model (and the
    pruned + int8 variants)."""
    cnn_int8 = [Variant("int8", quant="int8")]
    lm_int8 = [Variant("int8-dynamic", quant="int8-dynamic")]
    if quick:
        return [
            ModelPlan("demo:digits-cnn", [DENSE, *cnn_int8, Variant("block:4x1 90%", "block:4x1", 0.9)], finetune_steps=100,
                      note="--quick: 100 gradual-pruning steps (seconds on this model; one-shot 90% block pruning is at chance)"),
            ModelPlan("demo:mobilenetv2", [DENSE, *cnn_int8, Variant("block:4x1 90%", "block:4x1", 0.9), CNN_SPARSE_INT8],
                      load_kwargs={"eval_count": 300}, note="--quick: one-shot pruning, accuracy on 300 test images"),
            ModelPlan("demo:minilm-l6", [DENSE, *lm_int8, Variant("block:8x1 80%", "block:8x1", 0.8), LM_SPARSE_INT8],
                      load_kwargs={"eval_count": 16}, note="--quick: one-shot pruning, cosine on 16 passages"),
            ModelPlan("demo:smollm2-135m", [DENSE, Variant("block:8x1 80%", "block:8x1", 0.8)], formats=("pte",),
                      note="--quick: decode step as .pte only, no int8 (its dense baseline is dequantized 4-bit)"),
        ]
    blocks = _pruned(("block:4x1", "block:8x1"), (0.8, 0.9))
    both_int8 = [Variant("int8", quant="int8"), Variant("int8-dynamic", quant="int8-dynamic")]
    return [
        ModelPlan("demo:digits-cnn", [DENSE, *both_int8, *blocks], ("pte", "onnx", "tflite"), finetune_steps=300),
        ModelPlan("demo:mobilenetv2", [DENSE, *both_int8, *blocks, CNN_SPARSE_INT8], ("pte", "onnx", "tflite"), finetune_steps=300),
        ModelPlan("demo:minilm-l6", [DENSE, *both_int8, *blocks, LM_SPARSE_INT8], ("pte", "onnx", "tflite")),
        ModelPlan("demo:smollm2-135m", [DENSE, *lm_int8, Variant("block:8x1 80%", "block:8x1", 0.8), Variant("2:4", "nm:2:4", 0.0)],
                  ("pte", "onnx")),
    ]


@dataclass
class Timing:
    rounds: int = 3
    runs: int = 20
    warmup: int = 3
    min_seconds: float = 0.2
    threads: list[int] = field(default_factory=lambda: sorted({1, os.cpu_count() or 1}))


def _reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, EdgesparseError) else f"{type(exc).__name__}: {first_line(exc)}"


def _export(bundle, variant: Variant, formats: tuple[str, ...], steps: int, folder: Path) -> dict[str, dict]:
    """format -> {"manifest": ..., "entry": ..., "path": ...} or {"error": reason}. One export_model
    call for all formats; if it fails, each format alone, so each gets its own reason."""
    from edgesparse.pipeline import export_model, recipe_from_options

    prune = variant.sparsity if variant.pattern and not variant.pattern.startswith("nm") else None
    recipe = recipe_from_options(None, prune, variant.pattern, variant.quant, steps if variant.pattern else 0)

    def run(fmts: tuple[str, ...], out: Path) -> dict[str, dict]:
        manifest = export_model(bundle, recipe, out, list(fmts), finetune=bool(steps and variant.pattern))
        found = {}
        for entry in manifest["artifacts"]:
            found[entry["format"]] = {"manifest": manifest, "entry": entry, "path": out / entry["path"]}
        return found

    try:
        return run(formats, folder)
    except Exception as exc:
        if len(formats) == 1:
            return {formats[0]: {"error": _reason(exc)}}
    done = {}
    for fmt in formats:
        try:
            done.update(run((fmt,), folder / fmt))
        except Exception as exc:
            done[fmt] = {"error": _reason(exc)}
    return done


def _row(plan: ModelPlan, bundle, variant: Variant, fmt: str, result: dict) -> dict:
    row = {"model": plan.spec, "variant": variant.name, "pattern": variant.pattern, "sparsity_target": variant.sparsity,
           "quant": variant.quant, "format": fmt, "finetune_steps": plan.finetune_steps if variant.pattern else 0,
           "metric": bundle.metric}
    if "error" in result:
        return row | {"error": result["error"]}
    manifest, entry = result["manifest"], result["entry"]
    layers = manifest["layers"]
    metrics = manifest["metrics"]
    quality = entry.get(bundle.metric, metrics.get(f"{bundle.metric}_compressed"))
    row.update({
        "verified": entry["verified"], "max_abs_error": entry.get("max_abs_error"), "output_cosine": entry.get("cosine"),
        "swapped_layers": sum(1 for layer in layers if not layer["kernel"].startswith("dense")),
        "total_layers": len(layers), "sparsity_overall": manifest["sparsity_overall"], "bytes": entry["bytes"],
        "quality": quality, "quality_dense": metrics.get(f"{bundle.metric}_dense"),
        "quality_source": "artifact" if bundle.metric in entry else "eager (compressed model before export)",
        "artifact": str(result["path"]),
    })
    if quality is not None and row["quality_dense"] is not None:
        row["quality_delta"] = quality - row["quality_dense"]
    return row


def _profile(path: Path, fmt: str, threads: int, timing: Timing) -> dict:
    from edgesparse.devices.local import profile_local

    runtime = "cpp" if fmt == "pte" else "python"
    cpus = [0] if threads == 1 else None  # "1 thread": pinned to one CPU, whatever pool the runtime keeps
    return profile_local(path, runs=timing.runs, warmup=timing.warmup, threads=threads, runtime=runtime,
                         cpus=cpus, min_seconds=timing.min_seconds)


def _time_format(rows: list[dict], timing: Timing, advance) -> None:
    """Interleaved rounds over one model+format's rows (dense first); fills each row's p50s,
    speedups vs the dense row and the thread count the runtime reported."""
    timed = [r for r in rows if "error" not in r and r["format"] in ("pte", "onnx")]
    for r in rows:
        if "error" not in r and r["format"] not in ("pte", "onnx"):
            r["timing_note"] = f"not timed: profile_local runs .pte and .onnx, not .{r['format']}"
    dense = next((r for r in timed if r["quant"] == "none" and not r["pattern"]), None)
    for threads in timing.threads:
        key = "1t" if threads == 1 else "all"
        per_round: dict[int, list[float]] = {id(r): [] for r in timed}
        reported: dict[int, object] = {}
        failed: dict[int, str] = {}
        for _ in range(timing.rounds):
            for r in timed:
                if id(r) in failed:
                    continue
                try:
                    result = _profile(Path(r["artifact"]), r["format"], threads, timing)
                    per_round[id(r)].append(result["p50_ms"])
                    reported[id(r)] = result.get("threads")
                except Exception as exc:
                    failed[id(r)] = _reason(exc)
                advance(info=f"{r['model']} {r['variant']} .{r['format']} x{threads}")
        base = statistics.median(per_round[id(dense)]) if dense is not None and per_round[id(dense)] else None
        quantized = {r["quant"]: statistics.median(per_round[id(r)]) for r in timed
                     if r["quant"] != "none" and not r["pattern"] and per_round[id(r)]}
        for r in timed:
            samples = per_round[id(r)]
            r[f"threads_asked_{key}"] = threads
            r[f"threads_reported_{key}"] = reported.get(id(r))
            r[f"p50_rounds_ms_{key}"] = samples
            if id(r) in failed:
                r[f"timing_error_{key}"] = failed[id(r)]
            if samples:
                r[f"p50_ms_{key}"] = statistics.median(samples)
                if base is not None:
                    r[f"dense_p50_ms_{key}"] = base
                    r[f"speedup_{key}"] = base / r[f"p50_ms_{key}"]
                if r["pattern"] and r["quant"] in quantized:  # pruned + quantized: vs the same quantization, dense
                    r[f"speedup_vs_{r['quant']}_{key}"] = quantized[r["quant"]] / r[f"p50_ms_{key}"]


def _progress_total(plans: list[ModelPlan], timing: Timing) -> int:
    steps = 0
    for plan in plans:
        timed = len(plan.variants) * len([f for f in plan.formats if f in ("pte", "onnx")])
        steps += len(plan.variants) + timed * timing.rounds * len(timing.threads)
    return steps


def _load(plan: ModelPlan):
    import importlib

    from edgesparse.models import DEMOS, load_model

    name = plan.spec.removeprefix("demo:")
    if not plan.load_kwargs or not plan.spec.startswith("demo:") or name not in DEMOS:
        return load_model(plan.spec)
    module_name, func = DEMOS[name].split(":")
    return getattr(importlib.import_module(module_name), func)(**plan.load_kwargs)


def bench_models(quick: bool = False, models: list[str] | None = None, plans: list[ModelPlan] | None = None,
                 timing: Timing | None = None, workdir: str | Path | None = None, on_model=None) -> dict:
    """Run the grid (or `plans`); returns {"rows": [...], "misses": [...], "settings": {...}}.
    Artifacts go to `workdir` (a temp folder, deleted afterwards, when None). `on_model(result)`
    gets the result so far after each model (the CLI writes it, so a long run leaves its rows)."""
    from edgesparse import runtime_kernels

    if not runtime_kernels.available():
        raise EdgesparseError("the sparse kernels are not built", hint="run `make kernels`")
    plans = plans if plans is not None else grid(quick)
    if models:
        known = {p.spec for p in plans}
        unknown = [m for m in models if m not in known]
        if unknown:
            raise EdgesparseError(f"unknown model(s) {', '.join(unknown)} (available: {', '.join(sorted(known))})")
        plans = [p for p in plans if p.spec in models]
    timing = timing or (Timing() if quick else Timing(rounds=5, runs=50, warmup=5, min_seconds=1.0))
    started = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="edgesparse-bench-models-") as tmp, \
            _progress.bar("bench models", _progress_total(plans, timing)) as advance:
        root = Path(workdir) if workdir else Path(tmp)
        for plan in plans:
            try:
                with _progress.status(f"loading {plan.spec}"):
                    bundle = _load(plan)
            except Exception as exc:
                rows += [{"model": plan.spec, "variant": v.name, "pattern": v.pattern, "quant": v.quant, "format": fmt,
                          "error": f"could not load the model: {_reason(exc)}"} for v in plan.variants for fmt in plan.formats]
                advance(len(plan.variants) + len(plan.variants) * len(plan.formats) * timing.rounds * len(timing.threads))
                continue
            model_rows = []
            for index, variant in enumerate(plan.variants):
                folder = root / plan.spec.replace(":", "-") / f"{index}-{variant.name.replace(' ', '-').replace(':', '')}"
                results = _export(bundle, variant, plan.formats, plan.finetune_steps, folder)
                model_rows += [_row(plan, bundle, variant, fmt, results.get(fmt, {"error": "not exported"}))
                               for fmt in plan.formats]
                advance(info=f"exported {plan.spec} {variant.name}")
            for fmt in plan.formats:
                _time_format([r for r in model_rows if r["format"] == fmt], timing, advance)
            dense = {r["format"]: r for r in model_rows if r["variant"] == DENSE.name and "bytes" in r}
            for r in model_rows:
                if "bytes" in r and r["format"] in dense:
                    r["size_vs_dense"] = r["bytes"] / dense[r["format"]]["bytes"]
                if plan.note:
                    r["note"] = plan.note
            rows += model_rows
            del bundle
            if on_model is not None:
                on_model(_result(rows, quick, timing, started, done=plan is plans[-1]))
    return _result(rows, quick, timing, started, done=True)


def _result(rows: list[dict], quick: bool, timing: Timing, started: float, done: bool) -> dict:
    return {"rows": rows, "misses": misses(rows), "complete": done,
            "settings": {"quick": quick, "rounds": timing.rounds, "runs": timing.runs, "warmup": timing.warmup,
                         "min_seconds": timing.min_seconds, "threads": timing.threads, "cpu_count": os.cpu_count(),
                         "one_thread": "pinned to CPU 0 (sched_setaffinity), --threads 1",
                         "all_cores": f"unpinned, --threads {max(timing.threads)}",
                         "pte_runtime": "C++ runner", "onnx_runtime": "ONNX Runtime (python child)",
                         "wall_seconds": round(time.perf_counter() - started, 1)}}


def misses(rows: list[dict]) -> list[str]:
    """Every row that lacks something it should have: an export/verification failure, a failed
    timing, a thread count the runtime did not confirm, a speedup below 1 for a sparse variant."""
    out = []
    for r in rows:
        where = f"{r['model']} {r['variant']} .{r['format']}"
        if "error" in r:
            out.append(f"{where}: {r['error']}")
            continue
        if not r.get("verified"):
            out.append(f"{where}: not verified against torch (max abs err {r.get('max_abs_error')})")
        for key in ("1t", "all"):
            if f"timing_error_{key}" in r:
                out.append(f"{where} ({key}): {r[f'timing_error_{key}']}")
            reported = r.get(f"threads_reported_{key}")
            if f"threads_asked_{key}" in r and reported != r[f"threads_asked_{key}"]:
                out.append(f"{where} ({key}): runtime reported threads={reported!r}, asked {r[f'threads_asked_{key}']}")
            if r["pattern"] and r.get(f"speedup_{key}") is not None and r[f"speedup_{key}"] < 1.0:
                out.append(f"{where} ({key}): slower than dense ({r[f'speedup_{key}']:.2f}x)")
            vs_quant = r.get(f"speedup_vs_{r['quant']}_{key}")
            if vs_quant is not None and vs_quant < 1.0:
                out.append(f"{where} ({key}): slower than dense {r['quant']} ({vs_quant:.2f}x)")
        if r["pattern"] and not r.get("swapped_layers"):
            out.append(f"{where}: no layer runs on edgesparse kernels")
    return out


def _fmt(value, spec: str, default: str = "-") -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _vs_quant(r: dict, key: str) -> str:
    value = r.get(f"speedup_vs_{r['quant']}_{key}")
    return f" ({value:.2f}x vs {r['quant']})" if value is not None else ""


def to_markdown(result: dict) -> str:
    rows = result["rows"]
    lines = ["| model | variant | format | swapped / layers | size | vs dense | quality (metric) | vs dense | "
             "p50 1T ms | vs dense 1T | p50 all ms | vs dense all | threads 1T / all |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | {r['format']} | failed: {r['error'][:120].replace('|', '/')} |"
                         + " |" * 9)
            continue
        delta = r.get("quality_delta")
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['format']}{'' if r['verified'] else ' (NOT verified)'} "
            f"| {r['swapped_layers']} / {r['total_layers']} | {r['bytes'] / 2**20:.2f} MiB | {_fmt(r.get('size_vs_dense'), '.2f')}x "
            f"| {_fmt(r['quality'], '.4f')} ({r['metric']}) | {_fmt(delta, '+.4f')} "
            f"| {_fmt(r.get('p50_ms_1t'), '.3f')} | {_fmt(r.get('speedup_1t'), '.2f')}x{_vs_quant(r, '1t')} "
            f"| {_fmt(r.get('p50_ms_all'), '.3f')} | {_fmt(r.get('speedup_all'), '.2f')}x{_vs_quant(r, 'all')} "
            f"| {r.get('threads_reported_1t', '-')} / {r.get('threads_reported_all', '-')} |")
    s = result["settings"]
    lines += ["", f"{s['rounds']} interleaved rounds, runs >= {s['runs']} and >= {s['min_seconds']} s per profile; "
              f"1T = {s['one_thread']}; all = {s['all_cores']}; .pte in the {s['pte_runtime']}, .onnx in {s['onnx_runtime']}; "
              f"wall {s['wall_seconds']} s."]
    if result["misses"]:
        lines += ["", "Misses:", ""] + [f"- {m}" for m in result["misses"]]
    return "\n".join(lines) + "\n"
