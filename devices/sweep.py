"""`edgesparse sweep`: export and profile a grid of compressions, resumably, then compare them.

Each cell (prune, quant, format) is exported, verified and profiled on the device (quick mode: at
least 1 s of timed runs, so one slow moment cannot decide a cell); its row is
appended to OUT/results.jsonl the moment it is done (the full profile beside the cell's manifest), so a rerun skips finished cells (an
interrupted sweep loses at most the cell in flight). The table and OUT/pareto.png (latency vs
accuracy, marker area by file size) are rebuilt from the JSONL at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgesparse.errors import EdgesparseError


def parse_grid(text: str, kind) -> list:
    try:
        values = [kind(v.strip()) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise EdgesparseError(f"bad comma-separated values {text!r}") from None
    if not values:
        raise EdgesparseError(f"no values in {text!r}")
    return list(dict.fromkeys(values))


def cell_key(prune: float, quant: str, fmt: str) -> str:
    return f"prune{prune:g}-{quant}-{fmt}"


def read_rows(path: Path) -> list[dict]:
    """The finished rows; a torn last line (a killed run) is ignored."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def append_row(path: Path, row: dict) -> None:
    """One JSON line, on a line of its own even after a torn write."""
    with open(path, "ab+") as f:
        torn = False
        if f.seek(0, 2) > 0:
            f.seek(-1, 2)
            torn = f.read(1) != b"\n"
        f.write((b"\n" if torn else b"") + json.dumps(row).encode() + b"\n")


def sweep(model: str, prunes: list[float], quants: list[str], formats: list[str], device: str, out: Path,
          pattern: str = "block:4x1", runs: int = 100, warmup: int = 10, finetune_steps: int = 300) -> list[dict]:
    """finetune_steps: gradual pruning with the model's fine-tune hook (built-in demos have one)."""
    from edgesparse import _progress
    from edgesparse.models import load_model
    from edgesparse.pipeline import parse_formats

    formats = parse_formats(",".join(formats))
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {row["key"] for row in read_rows(results)}
    bundle = None
    cells = [(p, q) for p in prunes for q in quants]
    with _progress.bar("sweeping", len(cells)) as advance:
        for prune, quant in cells:
            todo = [f for f in formats if cell_key(prune, quant, f) not in done]
            if todo:
                bundle = bundle or load_model(model)
                run_cell(bundle, prune, quant, todo, pattern, device, out, runs, warmup, results, finetune_steps)
            advance(info=f"prune {prune:g}, quant {quant}")
    rows = [r for r in read_rows(results) if r["key"] in {cell_key(p, q, f) for p in prunes for q in quants for f in formats}]
    plot_pareto(rows, out / "pareto.png", f"{model} on {device}")
    return rows


def run_cell(bundle, prune: float, quant: str, formats: list[str], pattern: str, device: str, out: Path, runs: int,
             warmup: int, results: Path, finetune_steps: int) -> None:
    """Export and profile one (prune, quant) for each format; append one row per format."""
    from edgesparse._io import write_json_atomic
    from edgesparse.devices import profile
    from edgesparse.pipeline import export_model, recipe_from_options

    recipe = recipe_from_options(None, prune, pattern if prune > 0 else None, quant, finetune_steps if prune > 0 else 0)
    folder = out / f"prune{prune:g}-{quant}"
    for fmt in formats:
        row = {"key": cell_key(prune, quant, fmt), "prune": prune, "quant": quant, "format": fmt, "pattern": pattern,
               "device": device}
        try:
            record = export_model(bundle, recipe, folder / fmt, formats=[fmt])
            artifact = record["artifacts"][0]
            result = profile(folder / fmt / artifact["path"], device, mode="quick", runs=runs, warmup=warmup)
            write_json_atomic(folder / fmt / "profile.json", result)  # the full record, for `report` and `compare`
            row.update(bytes=artifact["bytes"], accuracy=artifact.get("accuracy", record["metrics"].get("accuracy_compressed")),
                       p50_ms=result["p50_ms"], p90_ms=result["p90_ms"], peak_rss_mb=result["peak_rss_mb"],
                       std_ms=result["std_ms"], count=result["count"],  # the median's noise band (compare)
                       runtime=result["runtime"], sparse_layers=sum(layer["kernel"] != "dense-xnnpack" for layer in record["layers"]))
        except EdgesparseError as exc:  # e.g. int8 ONNX is not supported yet: a row that says so
            row["skipped"] = exc.message
        append_row(results, row)


def pareto_front(rows: list[dict]) -> set[str]:
    """Keys of the rows no other row beats on latency, accuracy and size together."""
    measured = [r for r in rows if "p50_ms" in r and r.get("accuracy") is not None]

    def dominates(a, b):
        no_worse = a["p50_ms"] <= b["p50_ms"] and a["accuracy"] >= b["accuracy"] and a["bytes"] <= b["bytes"]
        better = a["p50_ms"] < b["p50_ms"] or a["accuracy"] > b["accuracy"] or a["bytes"] < b["bytes"]
        return no_worse and better

    return {r["key"] for r in measured if not any(dominates(o, r) for o in measured)}


def plot_pareto(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if "p50_ms" in r and r.get("accuracy") is not None]
    front = pareto_front(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for fmt, marker in (("pte", "o"), ("onnx", "s")):
        group = [r for r in measured if r["format"] == fmt]
        if not group:
            continue
        sizes = [max(20.0, r["bytes"] / 2048) for r in group]
        colors = ["tab:red" if r["key"] in front else "tab:blue" for r in group]
        ax.scatter([r["p50_ms"] * 1e3 for r in group], [100 * r["accuracy"] for r in group], s=sizes, c=colors,
                   marker=marker, alpha=0.7, label=f".{fmt}")
        for r in group:
            ax.annotate(f"{r['prune']:g}/{r['quant']}", (r["p50_ms"] * 1e3, 100 * r["accuracy"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("p50 latency (us)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{title}: red = Pareto front (latency, accuracy, size); area ~ file size", fontsize=9)
    ax.grid(alpha=0.3)
    if measured:
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".part.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
