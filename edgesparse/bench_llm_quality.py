"""Held-out perplexity of demo:smollm2-135m under each weight quantization and each one-shot
pruning method, from one run (the README's LLM table):

    python -m edgesparse.bench_llm_quality --json out/llm_quality.json [--rows dense,int4w:g64,wanda:nm:2:4,...]

Each row compresses a fresh copy of the model with `compress` (as `export` does, without writing
artifacts) and scores it with the bundle's own evaluate (perplexity on Hamlet, 4 x 256 tokens;
calibration on As You Like It). Quality only: decode speed is the C++ runner's business.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

from edgesparse.recipe import PruneConfig, QuantConfig, Recipe

DEFAULT_ROWS = ("dense", "int8-dynamic", "int4w:g32:rtn", "int4w:g32", "int4w:g64", "int4w:g128",
                "magnitude:unstructured", "wanda:unstructured", "sparsegpt:unstructured",
                "magnitude:nm:2:4", "wanda:nm:2:4", "sparsegpt:nm:2:4")


def recipe_for(row: str, calib_batches: int = 8) -> Recipe:
    """`dense`, `int8-dynamic`, `int4w:gN`, or `METHOD:PATTERN` (50% for unstructured/block)."""
    if row == "dense":
        return Recipe()
    if row == "int8-dynamic":
        return Recipe(quant=QuantConfig(mode="int8-dynamic"))
    if row.startswith("int4w:g"):  # int4w:gN[:gptq|rtn]
        group, _, method = row.removeprefix("int4w:g").partition(":")
        return Recipe(quant=QuantConfig(mode="int4w", group_size=int(group), method=method or "auto", calib_batches=calib_batches))
    method, _, pattern = row.partition(":")
    sparsity = 0.0 if pattern.startswith("nm") else 0.5
    return Recipe(prune=PruneConfig(sparsity=sparsity, pattern=pattern, method=method, calib_batches=calib_batches))


def bench(rows=DEFAULT_ROWS, calib_batches: int = 8, json_out: str | None = None) -> list[dict]:
    from edgesparse.compress import compress
    from edgesparse.layers import set_training
    from edgesparse.models.smollm2 import bundle as smollm2_bundle

    bundle = smollm2_bundle()
    results = []
    dense = None
    for row in rows:
        recipe = recipe_for(row, calib_batches)
        model = set_training(copy.deepcopy(bundle.model), False)
        started = time.perf_counter()
        result = compress(model, recipe, example_inputs=bundle.example_inputs,
                          calib=bundle.calib() if bundle.calib else None, wrapped=True)
        seconds = time.perf_counter() - started
        ppl = bundle.evaluate(lambda ids, m=result.model: m(ids))
        dense = ppl if row == "dense" else dense
        results.append({"row": row, "perplexity": round(ppl, 3), "vs_dense": round(ppl / dense, 4) if dense else None,
                        "sparsity": round(result.sparsity_overall, 4), "prune_method": result.prune_method,
                        "quant": result.quant, "compress_seconds": round(seconds, 1), "eval_set": bundle.notes[0]})
        print(json.dumps(results[-1]), flush=True)
        if json_out:
            from edgesparse._io import write_json_atomic

            write_json_atomic(json_out, results)
    return results


def to_markdown(rows: list[dict]) -> str:
    lines = ["| configuration | sparsity | perplexity | vs dense |", "|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['vs_dense']:.2f}x" if r.get("vs_dense") else "-"
        lines.append(f"| {r['row']} | {r['sparsity']:.1%} | {r['perplexity']:.2f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma-separated rows")
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    print(to_markdown(bench(rows, args.calib_batches, args.json_out)))


if __name__ == "__main__":
    main()
