"""Measuring the offloaded MoE runtime (devices/moe_runtime.py) here: `bench_moe` decodes at each
(policy, expert budget) in a fresh process with the export's page cache dropped first, and
`profile_moe` gives one such run in the shape of `edgesparse profile` results
(`edgesparse bench moe` and `edgesparse profile out/moe` call them).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from edgesparse.devices.local import parse_runner_output
from edgesparse.devices.moe_runtime import IO_MODES, POLICIES, check_budget
from edgesparse.errors import EdgesparseError

BUDGETS = (1.0, 0.5, 0.25, 0.125)
RUNTIME = Path(__file__).with_name("moe_runtime.py")


# ---------------------------------------------------------------------------------------------
# the page cache


def _resident_fraction(path: Path) -> float | None:
    """Share of the file's pages in the page cache (mincore on an untouched mapping)."""
    import numpy as np

    size = path.stat().st_size
    if size == 0:
        return 0.0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
        try:
            view = np.frombuffer(mm, np.uint8)
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            rc = libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec)
            del view
            return sum(b & 1 for b in vec) / pages if rc == 0 else None
        finally:
            mm.close()
    except (OSError, AttributeError):
        return None


def export_files(export_dir: Path, manifest: dict) -> list[Path]:
    return [export_dir / "moe.json", export_dir / manifest["backbone"]["file"]] + [
        export_dir / s["file"] for experts in manifest["experts"] for s in experts]


def _cached_share(files: list[Path]) -> float | None:
    sizes = {p: p.stat().st_size for p in files}
    fractions = {p: _resident_fraction(p) for p in files}
    known = [p for p in files if fractions[p] is not None]
    if not known:
        return None
    return sum(fractions[p] * sizes[p] for p in known) / max(1, sum(sizes[p] for p in known))


def drop_page_cache(files: list[Path]) -> dict:
    """Evict the export's files from the page cache before a cold run: per file with
    posix_fadvise(DONTNEED) after an fsync (dirty pages cannot be dropped), which spares the rest
    of a shared machine's cache; if pages remain (mincore says), the whole cache through
    /proc/sys/vm/drop_caches (root, where the kernel lets this system write it). Reports the
    method used and the share of the files' bytes still cached afterwards."""
    method, notes = None, []
    if hasattr(os, "posix_fadvise"):
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        method = "posix_fadvise(DONTNEED)"
    else:
        notes.append("posix_fadvise: not available on this OS")
    resident = _cached_share(files)
    if method is None or resident is None or resident > 0:
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
            method = "drop_caches"
            resident = _cached_share(files)
        except OSError as exc:
            notes.append(f"drop_caches: {exc.strerror or exc}")
    return {"method": method or "not possible", "note": "; ".join(notes) or None, "resident_after": resident}


# ---------------------------------------------------------------------------------------------
# one run in a fresh process


def _child(export: Path, policy: str, budget: float, tokens: int, prompt: str | None, io: str, drop_evicted: bool,
           timeout: float) -> dict:
    # -I: no PYTHONPATH, no user site; the child imports numpy and the standard library only
    cmd = [sys.executable, "-I", str(RUNTIME), str(export), "--policy", policy, "--budget", repr(float(budget)),
           "--tokens", str(tokens), "--io", io, "--json"]
    if prompt is not None:
        cmd += ["--prompt", prompt]
    if drop_evicted:
        cmd.append("--drop-evicted")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise EdgesparseError(f"the MoE runtime ({policy}, budget {budget}) timed out after {timeout:.0f} s") from None
    return parse_runner_output(proc.stdout, proc.stderr, proc.returncode, export.name, f"in the MoE runtime ({policy}, budget {budget})")


def export_dir(path) -> Path:
    """The export folder of `dir` or `dir/moe.json`."""
    path = Path(path)
    folder = path.parent if path.name == "moe.json" else path
    if not (folder / "moe.json").is_file():
        raise EdgesparseError(f"no MoE export at {path}: moe.json not found",
                              hint="export one with export_moe_offload or `edgesparse export ... --moe-offload`")
    return folder


def _resolve_export(source, dtype: str, work: Path) -> Path:
    """An export folder (or its moe.json) as is; a model, ModelBundle or model spec
    (demo:NAME, file.py:factory) is exported into `work` first (with dtype)."""
    if isinstance(source, os.PathLike) or (isinstance(source, str) and not source.startswith("demo:") and ".py:" not in source):
        return export_dir(source)
    from edgesparse.converters.moe_offload import export_moe_offload

    if isinstance(source, str):
        from edgesparse.models import load_model

        source = load_model(source)
    export_moe_offload(source, work, expert_budget=1.0, dtype=dtype)
    return work


# ---------------------------------------------------------------------------------------------
# the public calls


def bench_moe(source, budgets=BUDGETS, policies=POLICIES, tokens: int = 256, prompt: str | None = None,
              dtype: str = "fp32", io: str = "read", drop_cache: bool = True, drop_evicted: bool = False,
              repeats: int = 1, timeout: float = 600) -> list[dict]:
    """Decode `tokens` greedily at every (policy, budget), each in a fresh process (so peak RSS
    is that run's own), with the export's page cache dropped before each where the OS allows.
    `source`: an export folder / moe.json, or a model, ModelBundle or spec (exported first).
    Rows: policy, budget, peak_rss_mb, tokens_per_s, hit_rate, prefetch_precision,
    prefetch_recall, ... (budget 1 = all experts resident). With repeats > 1 each cell runs that
    many times, cells interleaved, and the row keeps the median tokens/s (and the runs)."""
    _check_cells(policies, budgets)
    if io not in IO_MODES:
        raise EdgesparseError(f"unknown expert io {io!r} (available: {', '.join(IO_MODES)})")
    if tokens < 1 or repeats < 1:
        raise EdgesparseError("tokens and repeats must be >= 1")
    with tempfile.TemporaryDirectory(prefix="edgesparse-moe-") as work:
        export = _resolve_export(source, dtype, Path(work) / "moe")
        manifest = json.loads((export / "moe.json").read_text())
        files = export_files(export, manifest)
        runs: dict[tuple[str, float], list[dict]] = {}
        for _ in range(repeats):
            for budget in budgets:
                for policy in policies:
                    cache = drop_page_cache(files) if drop_cache else {"method": "not requested", "note": None, "resident_after": None}
                    result = _child(export, policy, budget, tokens, prompt, io, drop_evicted, timeout)
                    result["page_cache"] = cache
                    runs.setdefault((policy, float(budget)), []).append(result)
    reference = next((r[0]["generated_ids"] for (p, b), r in runs.items() if b >= 1), None)
    rows = []
    for (policy, budget), results in runs.items():
        rows.append(_row(policy, budget, results, manifest, reference))
    return rows


def _check_cells(policies, budgets) -> None:
    """Fail here, before any child process starts, on a policy or budget the runtime refuses."""
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise EdgesparseError(f"unknown cache policy {unknown[0]!r} (available: {', '.join(POLICIES)})")
    for budget in budgets:
        check_budget(budget)


def _row(policy: str, budget: float, results: list[dict], manifest: dict, reference) -> dict:
    tps = [r["tokens_per_s"] for r in results]
    mid = sorted(results, key=lambda r: r["tokens_per_s"])[len(results) // 2]
    times = sorted(t for r in results for t in r["times_ms"])
    return {
        "policy": policy, "budget": budget, "dtype": manifest.get("dtype"),
        "peak_rss_mb": round(statistics.median([r["peak_rss_mb"] for r in results]), 2),
        "rss_before_load_mb": round(statistics.median([r["rss_before_load_mb"] for r in results]), 2),
        "model_rss_mb": round(statistics.median([r["peak_rss_mb"] - r["rss_before_load_mb"] for r in results]), 2),
        "tokens_per_s": round(statistics.median(tps), 1), "tokens_per_s_runs": [round(t, 1) for t in tps],
        "p50_ms": round(times[len(times) // 2], 4), "tokens": mid["tokens"],
        "hit_rate": round(mid["hit_rate"], 4), "ready_hit_rate": round(mid["ready_hit_rate"], 4),
        **{k: None if mid[k] is None else round(mid[k], 4)
           for k in ("prefetch_precision", "prefetch_recall", "predictor_precision", "predictor_recall")},
        "budget_bytes": mid["budget_bytes"], "expert_bytes_total": mid["expert_bytes_total"],
        "cache_peak_bytes": max(r["cache_peak_bytes"] for r in results),
        "backbone_bytes": manifest.get("backbone_bytes"),
        "demand_loads": mid["demand_loads"], "prefetch_loads": mid["prefetch_loads"], "evictions": mid["evictions"],
        "stall_ms": round(mid["stall_ms"], 2), "load_ms": round(mid["load_ms"], 2), "prefill_ms": round(mid["prefill_ms"], 2),
        "tokens_match_all_resident": None if reference is None else all(r["generated_ids"] == reference for r in results),
        "page_cache": mid["page_cache"]["method"], "page_cache_resident_after_drop": mid["page_cache"]["resident_after"],
        "page_cache_note": mid["page_cache"]["note"], "io": mid["io"], "drop_evicted": mid["drop_evicted"],
        "torch_imported": any(r["torch_imported"] for r in results), "runs": len(results),
    }


def goals(rows: list[dict], budget: float = 0.25) -> dict:
    """The issue's goals at `budget`, per policy: peak RSS and tokens/s against all-resident
    (budget 1, same policy), model-only RSS (above the interpreter) and expert-cache bytes too;
    and predictive's hit rate minus LRU's."""
    by = {(r["policy"], r["budget"]): r for r in rows}
    out = {}
    for policy in POLICIES:
        full, part = by.get((policy, 1.0)), by.get((policy, budget))
        if not full or not part:
            continue
        out[policy] = {
            "peak_rss_ratio": round(part["peak_rss_mb"] / full["peak_rss_mb"], 3),
            "model_rss_ratio": round(part["model_rss_mb"] / full["model_rss_mb"], 3) if full["model_rss_mb"] > 0 else None,
            "tokens_per_s_ratio": round(part["tokens_per_s"] / full["tokens_per_s"], 3),
            "hit_rate": part["hit_rate"],
        }
    if "predictive" in out and "lru" in out:
        out["predictive_minus_lru_hit_points"] = round(100 * (out["predictive"]["hit_rate"] - out["lru"]["hit_rate"]), 1)
    return out


def format_table(rows: list[dict]) -> str:
    """A markdown table of the rows (the README's)."""
    head = ("| budget | policy | peak RSS MB | model RSS MB | expert cache peak MiB | tokens/s | hit rate (ready) | "
            "prefetch precision | prefetch recall | tokens = all-resident |\n|---|---|---|---|---|---|---|---|---|---|")
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines = [head]
    for r in sorted(rows, key=lambda r: (-r["budget"], POLICIES.index(r["policy"]))):
        lines.append(f"| {100 * r['budget']:g}% | {r['policy']} | {r['peak_rss_mb']:.1f} | {r['model_rss_mb']:.1f} | "
                     f"{r['cache_peak_bytes'] / 2**20:.2f} | {r['tokens_per_s']:.0f} | {pct(r['hit_rate'])} ({pct(r['ready_hit_rate'])}) | "
                     f"{pct(r['prefetch_precision'])} | {pct(r['prefetch_recall'])} | "
                     f"{'yes' if r['tokens_match_all_resident'] else 'NO'} |")
    return "\n".join(lines)


def profile_moe(path, policy: str = "predictive", budget: float | None = None, tokens: int = 256,
                prompt: str | None = None, io: str = "read", drop_cache: bool = True, timeout: float = 600) -> dict:
    """One decode run of an export (folder or moe.json) in a fresh process, summarized like
    `edgesparse profile`: count, mean_ms, std_ms, min_ms, p50/p90/p95/p99_ms per token,
    load_ms, first_run_ms (the first decode step), peak_rss_mb, tokens_per_s, plus the cache
    statistics, the export's identity and the device state around the run."""
    from edgesparse.devices.local import summarize
    from edgesparse.devices.transports import Local

    export = export_dir(path)
    manifest = json.loads((export / "moe.json").read_text())
    if budget is None:
        budget = manifest.get("budget", 1.0)
    _check_cells([policy], [budget])
    files = export_files(export, manifest)
    before = Local().info()
    cache = drop_page_cache(files) if drop_cache else {"method": "not requested", "note": None, "resident_after": None}
    result = _child(export, policy, budget, tokens, prompt, io, False, timeout)
    times = result.pop("times_ms")
    out = {**summarize(times), "first_run_ms": times[0], "load_ms": result["load_ms"],
           "peak_rss_mb": result["peak_rss_mb"], "rss_before_load_mb": result["rss_before_load_mb"],
           "tokens_per_s": result["tokens_per_s"]}
    for key in ("policy", "budget", "budget_bytes", "expert_bytes_total", "cache_peak_bytes", "hit_rate",
                "ready_hit_rate", "prefetch_precision", "prefetch_recall", "predictor_precision", "predictor_recall",
                "demand_loads", "prefetch_loads", "evictions", "stall_ms", "prefill_ms", "tokens", "prompt_tokens",
                "generated"):
        out[key] = result[key]
    digest = hashlib.sha256((export / "moe.json").read_bytes()).hexdigest()
    out.update(artifact=str(export / "moe.json"), bytes=sum(p.stat().st_size for p in files), sha256=digest,
               runtime="numpy (devices/moe_runtime.py)", threads=1, page_cache=cache["method"],
               page_cache_resident_after_drop=cache["resident_after"],
               device_state={"before": before, "after": Local().info()},
               memory_note=("peak_rss_mb is the runtime process's VmHWM: python + numpy + backbone + KV cache + "
                            "the expert cache (mapped expert pages count while mapped); rss_before_load_mb is "
                            "the level after importing numpy, before the model was loaded"))
    return out
